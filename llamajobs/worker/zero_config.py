"""DeepSpeed's config for the ds-* strategies, built from the JobSpec as a dict: by the Zero strategy
(zero.py) on the node, with the real world size and device, and by render.py into RUN_DIR/ds_config.json
at submit time, with the planned ones. One function for both, so the file and the worker never
differ. No torch here: render imports it on the login node.
"""

from __future__ import annotations

from llamajobs import catalog
from llamajobs.spec import JobSpec

DS_CONFIG = "ds_config.json"  # in the run dir, ds-* strategies only


def ds_config(spec: JobSpec, *, world_size: int | None = None, cuda: bool | None = None) -> dict:
    """DeepSpeed's config for a ds-* spec, every value filled from the spec (none left "auto").

    spec.json is the one source of truth: the run dir's ds_config.json is this function's output for
    the planned world size and device, and the worker calls it again on the node with the real ones
    (the launch counts the GPUs there; --device auto decides bf16 or fp32 there). Buckets are sized
    from the hidden size d as Hugging Face's "auto" sizes them: d^2 elements per reduce (and ZeRO-2
    all-gather) bucket, 0.9 d^2 per ZeRO-3 prefetch, parameters under 10 d elements kept whole.

    The optimizer is not configured here: the worker builds it (torch AdamW, or DeepSpeed's CPU Adam
    when the optimizer is offloaded) with the same parameter groups as the FSDP strategies, and steps
    the learning-rate schedule itself.
    """
    info = spec.strategy_info
    if not info.deepspeed:
        raise ValueError(f"--strategy {spec.strategy} is not a DeepSpeed strategy "
                         f"({', '.join(sorted(catalog.DEEPSPEED_STRATEGIES))})")
    if cuda is None:  # the plan: GPUs on SLURM unless --device cpu; the CPU elsewhere
        cuda = spec.plans_gpus
    d = spec.shape.dim
    zero: dict = {
        "stage": info.zero_stage,
        "overlap_comm": cuda,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": d * d,
    }
    if info.zero_stage == 2:
        zero |= {"allgather_partitions": True, "allgather_bucket_size": d * d}
    else:
        zero |= {
            "stage3_prefetch_bucket_size": int(0.9 * d * d),
            "stage3_param_persistence_threshold": 10 * d,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    if info.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    if info.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    zero["sub_group_size"] = 1_000_000_000
    return {
        "train_batch_size": spec.global_batch,
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.accum_steps(world_size),
        # Unmanaged: backward() only accumulates, step() is the boundary (the loop's own accumulation).
        "managed_gradient_accumulation": False,
        "gradient_clipping": spec.grad_clip,
        "bf16": {"enabled": cuda},
        "fp16": {"enabled": False},
        "communication_data_type": "fp32",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
