"""Estimates: hours per epoch (predicted, a planning grid, or measured from a job) and memory fit.

The model is llamajobs/estimate.py: pure and light (no torch), so its help texts come from it."""

from __future__ import annotations

from typing import Any, Callable

import click

from llamajobs import catalog, estimates, ops, views
from llamajobs.cli.options import (TRAINING_OPTIONS, json_option, optional_job_argument, options, runs_dir_option, typed,
                                   within)
from llamajobs.estimate import DEFAULT, DEFAULT_GPU, expected_error_text
from llamajobs.spec import parse_count

_ERRORS = "; ".join(f"{s} {expected_error_text(s)}" for s in catalog.STRATEGIES)
HOURS_HELP = f"""Hours per epoch: predicted from the model, or measured from JOB's throughput.

Predicted, leading with the plan it would run (--micro-batch auto: the fastest that fits): FLOPs
per token (6N + 12·L·d·s; 4N with a frozen base) at our worker's measured compute efficiency, no
faster than the host issues each micro-batch, plus FSDP's memory copies, all-gathers and
reduce-scatters over NVLink, PCIe (--gpu ...-pcie) or the nodes' NICs, offload's PCIe traffic and
CPU Adam (README "How estimates are made"). MFU is model FLOPs
over the catalog's datasheet peak. --size and --strategy take a comma list or `all` (every size but
tiny; every strategy) for a planning grid. Expected error, checked against published runs: {_ERRORS}.

Measured (JOB): steady tokens/s without warm-up steps and checkpoint pauses, the hours per epoch
and the time remaining, with the measured MFU.
"""


def estimate_options(f: Callable) -> Callable:
    """What both estimate commands take besides the training flags."""
    return options([
        click.option("--gpu", default=None,
                     help=f"One of {', '.join(catalog.GPUS)} (default: site.yaml's gpu, else {DEFAULT_GPU}); "
                          f"another name "
                          f"needs --peak-tflops and --gpu-mem-gib."),
        click.option("--peak-tflops", type=within("peak_tflops", click.FloatRange, min_open=True), default=None,
                     help="Dense bf16 peak of the GPU, TFLOP/s (overrides the catalog's)."),
        click.option("--gpu-mem-gib", type=within("gpu_mem_gib", click.FloatRange, min_open=True), default=None,
                     help="Memory of the GPU, GiB (overrides the catalog's)."),
        click.option("--cpu-mem-gib", type=within("cpu_mem_gib", click.FloatRange, min_open=True), default=None,
                     help=f"Host RAM per node, GiB (default: --mem-per-node, else {DEFAULT.node_ram_gib:g})."),
        click.option("--assume", multiple=True, metavar="NAME=VALUE",
                     help="Override one of the model's constants (repeatable), e.g. network_gbps=100; "
                          "see llamajobs/estimate.py Assumptions."),
    ])(f)


@click.group()
def estimate() -> None:
    """Hours per epoch and memory fit, before or during a run."""


@estimate.command(help=HOURS_HELP)
@optional_job_argument
@options(TRAINING_OPTIONS)
@estimate_options
@click.option("--tokens", default=None, help="Tokens per epoch, e.g. 2.5B, 800M or 2500000000 (default: the spec's).")
@runs_dir_option
@json_option
def hours(job_id: int | None, gpu: str | None, peak_tflops: float | None, gpu_mem_gib: float | None,
          cpu_mem_gib: float | None, assume: tuple[str, ...], tokens: str | None, runs_dir: str | None,
          as_json: bool, **values: Any) -> None:
    a = estimates.assumptions(assume)
    count = parse_count(tokens) if tokens else None
    flags = typed(values)
    if job_id is not None:
        result = estimates.measured_hours(ops.runs_dir(runs_dir), job_id, count, a)
    elif not (flags or gpu or peak_tflops or gpu_mem_gib or cpu_mem_gib or assume or tokens):
        start = estimates.starting_grid(a)  # a bare `estimate hours`: a table to start from
        views.err.print(start.basis, markup=False)
        views.print_json(start.result.to_json()) if as_json else views.grid(start.result, start.accelerator)
        return
    else:
        accel = ops.accelerator(gpu or ops.site_gpu(), peak_tflops, gpu_mem_gib)
        if (result := estimates.grid(flags, accel, count, a, cpu_mem_gib)) is not None:
            views.print_json(result.to_json()) if as_json else views.grid(result, accel)
            return
        spec, _ = ops.build_spec(flags, cluster_default="slurm")
        result = estimates.predicted_hours(spec, accel, count, a, cpu_mem_gib)
    views.print_json(result.to_json()) if as_json else views.hours_table(result)


@estimate.command()
@options(TRAINING_OPTIONS)
@estimate_options
@json_option
def memory(gpu: str | None, peak_tflops: float | None, gpu_mem_gib: float | None, cpu_mem_gib: float | None,
           assume: tuple[str, ...], as_json: bool, **values: Any) -> None:
    """Every strategy's GPU and CPU memory, a verdict, and the fastest strategy that fits.

    Per GPU: model states (by strategy, as DeepSpeed's own estimators count them), the unsharded fp32
    gradient FSDP2 accumulates over micro-batches (unless sharded accumulation is picked), activations
    (measured per layer), the loss and the framework. Each strategy at its own micro-batch under
    --micro-batch auto (the default). Per node's CPU: offloaded states, loading the weights once, the worker
    processes. fits: below 90% of the memory; tight: up to 100%. --size takes a comma list or `all`.
    """
    a = estimates.assumptions(assume)
    accel = ops.accelerator(gpu or ops.site_gpu(), peak_tflops, gpu_mem_gib)
    flags = typed(values)
    if (result := estimates.grid(flags, accel, None, a, cpu_mem_gib)) is not None:
        views.print_json(result.to_json()) if as_json else views.grid(result, accel)
        return
    spec, _ = ops.build_spec(flags, cluster_default="slurm")
    result = estimates.memory_table(spec, accel, a, cpu_mem_gib)
    views.print_json(result.to_json()) if as_json else views.memory_table(result, spec, accel)
