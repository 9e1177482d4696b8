"""What a submit checks against the hardware before anything is queued: the estimate's fit on the
GPU type (--gpu) and the node's RAM, or on a cluster whose node is this host, this host's own RAM and
GPUs; and the partition's GraceTime against the checkpoint's save. Bad input raises SpecError."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import llamajobs.spec
from llamajobs import catalog, cluster, estimate
from llamajobs.errors import SpecError
from llamajobs.spec import JobSpec


def accelerator(gpu: str | None, peak_tflops: float | None = None, gpu_mem_gib: float | None = None
                ) -> catalog.Accelerator:
    """--gpu from the catalog (its numbers overridable), or a card it lacks given both numbers."""
    name = gpu or estimate.DEFAULT_GPU
    if name in catalog.GPUS:
        base = catalog.GPUS[name]
    elif peak_tflops and gpu_mem_gib:
        return catalog.Accelerator(name=name, peak_bf16_flops=peak_tflops * 1e12, memory_gib=gpu_mem_gib)
    else:
        raise SpecError(f"--gpu {name!r} is not known; choose one of {', '.join(catalog.GPUS)}, "
                        f"or give --peak-tflops and --gpu-mem-gib for it")
    return dataclasses.replace(base, peak_bf16_flops=peak_tflops * 1e12 if peak_tflops else base.peak_bf16_flops,
                               memory_gib=gpu_mem_gib or base.memory_gib)


def plan_for_gpu(spec: JobSpec, accel: catalog.Accelerator | None, a: estimate.Assumptions = estimate.DEFAULT,
                 cpu_mem_gib: float | None = None) -> JobSpec:
    """The spec as it will run on `accel`: --micro-batch auto resolved to the fastest micro-batch that
    fits, FSDP's accumulation (sharded when the unsharded fp32 gradient does not fit) and --shard-within
    auto to the faster layout that fits. A run not
    planned on GPUs (local, --device cpu) or an eval job is returned as it is."""
    if accel is None or spec.evaluation is not None or not spec.plans_gpus:
        return spec
    plan = estimate.resolve(spec, accel, a, node_ram_gib(spec, cpu_mem_gib))
    if spec.micro_batch_auto:
        spec = llamajobs.spec.with_auto_micro_batch(spec, plan.micro_batch)
    if spec.shard_within == "auto" and spec.strategy_info.fsdp:  # recorded: the worker runs what spec.json says
        spec = dataclasses.replace(spec, shard_within=plan.shard_within, shard_within_auto=True)
    return dataclasses.replace(spec, sharded_accumulation=plan.sharded_accumulation)


def node_ram_gib(spec: JobSpec, cpu_mem_gib: float | None = None) -> float | None:
    """--cpu-mem-gib, else the spec's --mem-per-node (SLURM syntax, megabytes without a suffix)."""
    if cpu_mem_gib:
        return cpu_mem_gib
    value = spec.mem_per_node.upper()
    if value in ("0", ""):
        return None
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    unit = value[-1] if value[-1] in scale else "M"
    return float(value.rstrip("KMGT")) * scale[unit]


@dataclass(frozen=True, slots=True)
class FitCheck:
    accelerator: catalog.Accelerator | None  # the GPU the estimate assumed; None for a run on this host
    note: str  # " (a100-80g assumed; pass --gpu)" when --gpu was not given
    warning: str | None = None  # a dry run's "does not fit", which a real submit refuses
    spec: JobSpec | None = dataclasses.field(default=None, compare=False)  # as it will run there (auto resolved)


def fit_check(spec: JobSpec, gpu: str | None, force: bool = False, dry_run: bool = False,
              no_controller: bool = False) -> FitCheck:
    """Refuse (SpecError) a run the estimate says will not fit, unless --force; a dry run only warns.
    On a cluster whose node is this host (local) the host's own RAM and GPUs decide; elsewhere the
    GPU type (--gpu) and the node's RAM. `no_controller`: the cluster was chosen because no SLURM
    controller answered, which the refusal says."""
    if spec.cluster_info.host_is_node:
        return _host_fit(spec, force, dry_run, no_controller)
    if spec.device == "cpu":
        return FitCheck(None, "", spec=spec)
    accel = accelerator(gpu)
    note = "" if gpu else f" ({accel.name} assumed; pass --gpu)"
    spec = plan_for_gpu(spec, accel)
    problem = estimate.fit_check(spec, accel, node_ram_gib=node_ram_gib(spec))
    if problem and not force and not dry_run:
        raise SpecError(f"{problem}; --force submits anyway{note}")
    return FitCheck(accel, note, f"{problem}{note}" if problem and not force else None, spec=spec)


def _host_fit(spec: JobSpec, force: bool, dry_run: bool, no_controller: bool) -> FitCheck:
    """The local cluster's node is this host: what it lacks is known before anything starts."""
    from llamajobs.cluster import local

    elsewhere = " or ".join(c.name for c in catalog.CLUSTER.values() if not c.host_is_node)
    if spec.fp8 and spec.device != "cpu" and local.host_gpus() == 0:  # a sure failure on the node: even with --force
        raise SpecError(f"--fp8 needs an H100-class GPU (float8 matmuls); this host, the {spec.cluster} cluster's "
                        f"node, has no GPU: leave --fp8 out, or submit to --cluster {elsewhere}")
    ram = local.host_ram_gib()
    if spec.plans_gpus or spec.evaluation is not None or ram is None:
        return FitCheck(None, "", spec=spec)
    needed = estimate.host_memory_gib(spec)
    if needed <= ram:
        return FitCheck(None, "", spec=spec)
    ways = [w for w, applies in (("--size tiny", spec.model_path is None and spec.size != "tiny"),
                                 ("--mode lora", not spec.mode_info.frozen_base)) if applies]
    cluster_way = f"a GPU cluster (--cluster {elsewhere}" + ("; none answered `scontrol ping` here)" if no_controller
                                                           else ")")
    problem = (f"{spec.shape.name} {spec.mode} with --strategy {spec.strategy} on the {spec.cluster} cluster needs "
               f"~{needed:.0f} GiB of RAM on this host (its node), which has {ram:.0f} GiB; use "
               f"{', '.join(ways + [cluster_way])}, or --force to run anyway")
    if not force and not dry_run:
        raise SpecError(problem)
    return FitCheck(None, "", problem if not force else None, spec=spec)


def preemption_warning(spec: JobSpec) -> str | None:
    """Where jobs are preempted: a warning when the partition's GraceTime is too short for this job's save."""
    if not spec.cluster_info.preempts:
        return None
    from llamajobs import submit

    try:
        partition = cluster.backend(spec.cluster).partition(spec.partition)
        return submit.grace_warning(spec, partition) if partition is not None else None
    except cluster.SubmitError:  # scontrol cannot tell; the submit itself will say more
        return None
