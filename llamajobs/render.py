"""Render templates/ into a run dir: spec.json, the per-node launch.sh, a standalone job.sbatch, and
for the DeepSpeed strategies ds_config.json."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path

import jinja2

from llamajobs import __version__, catalog, control
from llamajobs.site import Site
from llamajobs.spec import JobSpec
from llamajobs.values import check_text

RENDERED = ("spec.json", "launch.sh", "job.sbatch")
DS_CONFIG = "ds_config.json"  # ds-* strategies only


def templates_dir() -> Path:
    # A wheel carries templates/ inside the package; a source checkout has it at the top level.
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


@functools.cache  # one environment: its templates are compiled once per process
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # Every value that reaches a shell goes through one of these filters: a path with a space or a
    # quote in a job name must not become shell syntax. `shell` keeps the value literal; `expand` (the
    # site's cache_dir only) double-quotes it so that its $VARIABLES expand on the node and nothing else.
    env.filters["shell"] = lambda value: shlex.quote(str(value))
    env.filters["expand"] = lambda value: '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return env


def sbatch_options(spec: JobSpec) -> list[tuple[str, str]]:
    """The #SBATCH options that come straight from the spec, in a stable order."""
    values = {
        "partition": spec.partition, "account": spec.account, "qos": spec.qos, "time": spec.time,
        "constraint": spec.constraint, "exclude": spec.exclude, "mail-user": spec.mail_user,
        "mail-type": spec.mail_type,
    }
    return [(k, v) for k, v in values.items() if v]


def gres(spec: JobSpec, site: Site) -> str | None:
    """The job's --gres: GPUs asked per node on a cluster that allocates them, unless --device cpu."""
    return site.gres_for(spec.gpus_per_node) if spec.cluster_info.allocates_gpus and spec.device != "cpu" else None


def ds_config(spec: JobSpec, *, world_size: int | None = None, cuda: bool | None = None) -> dict:
    """DeepSpeed's config for a ds-* spec, every value filled from the spec (none left "auto").

    spec.json is the one source of truth: the run dir's ds_config.json is this function's output for
    the planned world size and device, and the worker calls it again on the node with the real ones
    (the launch counts the GPUs there; --device auto decides bf16 or fp32 there). Buckets are sized
    from the hidden size d as Hugging Face's "auto" sizes them: d^2 elements per reduce (and ZeRO-2
    all-gather) bucket, 0.9 d^2 per ZeRO-3 prefetch, parameters under 10 d elements kept whole."""
    info = spec.strategy_info
    if not info.deepspeed:
        raise ValueError(f"--strategy {spec.strategy} is not a DeepSpeed strategy "
                         f"({', '.join(sorted(catalog.DEEPSPEED_STRATEGIES))})")
    world_size = spec.world_size if world_size is None else world_size
    if cuda is None:  # the plan: GPUs on SLURM unless --device cpu; the CPU elsewhere
        cuda = spec.plans_gpus
    accum, rest = divmod(spec.global_batch, spec.micro_batch * world_size)
    if rest or not accum:
        raise ValueError(f"--global-batch {spec.global_batch} is not a multiple of --micro-batch {spec.micro_batch} x "
                         f"world size {world_size}; change --global-batch or --micro-batch")
    d = spec.shape.dim
    context = {
        "spec": spec, "accum": accum, "cuda": cuda, "stage": info.zero_stage,
        "offload_optimizer": info.offload_optimizer, "offload_param": info.offload_params,
        "reduce_bucket": d * d, "prefetch_bucket": int(0.9 * d * d), "persistence_threshold": 10 * d,
    }
    return json.loads(_environment().get_template(DS_CONFIG + ".j2").render(context))


def render(spec: JobSpec, site: Site, out_dir: str | Path, run_dir: str | None = None) -> list[Path]:
    """Write the rendered files into out_dir; `run_dir` is where they will live when it differs."""
    out = Path(out_dir)
    check_text("run dir", run_dir or str(out.absolute()))  # (the spec and the site checked their own values)
    out.mkdir(parents=True, exist_ok=True)
    context = {
        "spec": spec,
        "site": site,
        "run_dir": run_dir or str(out.absolute()),
        "python": site.python or sys.executable,
        # The container command as words, each quoted: data, whatever its paths hold.
        "container": "".join(shlex.quote(word) + " " for word in shlex.split(site.container or "")),
        "version": __version__,
        "sbatch_options": sbatch_options(spec),
        "gres": gres(spec, site),
        "exclude": site.excluded(spec.exclude),  # --exclude and the site's keep_out nodes
        "signal_delay_s": control.signal_delay_s(spec),
        "stop_wait_s": control.stop_wait_s(spec),
        # What the job runs is the spec's to say: training, or an eval (`llamajobs eval --cluster`).
        "worker_module": "llamajobs.worker" if spec.evaluation is None else "llamajobs.worker.evaluate",
    }
    env = _environment()
    written = []
    for name in RENDERED + ((DS_CONFIG,) if spec.strategy_info.deepspeed else ()):
        if name == DS_CONFIG:
            text = json.dumps(ds_config(spec), indent=2) + "\n"
        else:
            text = spec.to_json() if name == "spec.json" else env.get_template(name + ".j2").render(context)
        path = out / name
        path.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            os.chmod(path, 0o755)
        written.append(path)
    return written
