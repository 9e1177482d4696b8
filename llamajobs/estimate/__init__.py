"""The FLOPs, memory and time model behind `llamajobs estimate`. Pure functions, no I/O.

How to read it: a run is a `Plan` (plan.py: shape, strategy, mode, batch, GPUs; `Plan.from_spec`
builds one from a JobSpec, where every default lives). `memory(plan, gpu)` (memory.py) adds up bytes
per GPU and per node's CPU, term by term; `step_time(plan, gpu)` (timing.py) adds up seconds per
optimizer step, term by term; `hours(plan, gpu, tokens)` turns that into hours per epoch. Every
constant is a field of `Assumptions` (assumptions.py), with its source beside it; pass your own
(`dataclasses.replace(DEFAULT, ...)`, or `--assume name=value` on the command line) to change one.
planning.py compares strategies and checks a submit's fit; measured.py reads a job's own
throughput; anchors.py holds the published measurements the model is calibrated on or checked
against (`compare_anchors()` recomputes the README's table of them).
"""

from llamajobs.catalog import flops_per_token, recompute_flops_per_token  # (the worker's MFU uses them too)
from llamajobs.estimate.anchors import (ANCHORS, BENCH_CASES, FALCON_7B, TINYLLAMA, Anchor, anchors_markdown,
                                        bench_predictions, compare_anchors, fit_loop_efficiency,
                                        plain_loop_tokens_per_s, predict_anchor)
from llamajobs.estimate.assumptions import (DEFAULT, GPU_FACTS, OTHER_GPU, Assumptions, GpuFacts, gpu_facts,
                                            with_overrides)
from llamajobs.estimate.measured import hours_from_metrics
from llamajobs.estimate.memory import (GIB, LOSS_CHUNK_TOKENS, activation_bytes, autocast_weight_bytes, gathered_bytes,
                                       fused_loss_bytes, gradient_bytes, largest_module_params, loading_bytes, logits_bytes, memory,
                                       staging_bytes,
                                       model_state_bytes, verdict)
from llamajobs.estimate.plan import Plan, as_plan, plan_for_strategy
from llamajobs.estimate.planning import (DEFAULT_GPU, fit_check, grid_row, host_memory_gib, hours_for_spec,
                                         memory_table, micro_batch_choices, resolve, shard_choice)
from llamajobs.estimate.results import (Grid, GridRow, MeasuredHours, MemoryRow, MemoryTable, PredictedHours,
                                        RunSummary, StepPlan)
from llamajobs.estimate.published import PUBLISHED, Published, compare_published, predict_published, published_markdown
from llamajobs.estimate.timing import (EXPECTED_ERROR, UNCHECKED, compute_efficiency, cpu_adam_params_per_s,
                                       expected_error_text, host_floor_s, hours, interconnect_gbps,
                                       largest_fitting_micro_batch, ops_per_layer, step_time, throughput)

__all__ = [
    "ANCHORS", "BENCH_CASES", "DEFAULT", "DEFAULT_GPU", "EXPECTED_ERROR", "FALCON_7B", "GIB", "GPU_FACTS", "OTHER_GPU",
    "TINYLLAMA", "UNCHECKED", "Anchor", "Assumptions", "GpuFacts", "Plan", "activation_bytes", "anchors_markdown",
    "as_plan", "bench_predictions", "compare_anchors", "compute_efficiency", "cpu_adam_params_per_s",
    "expected_error_text", "fit_check", "fit_loop_efficiency", "flops_per_token", "gathered_bytes", "gpu_facts",
    "grid_row", "host_memory_gib", "hours", "hours_for_spec", "hours_from_metrics", "largest_fitting_micro_batch",
    "fused_loss_bytes", "largest_module_params", "loading_bytes", "logits_bytes", "memory", "memory_table", "model_state_bytes",
    "plain_loop_tokens_per_s", "plan_for_strategy", "predict_anchor", "recompute_flops_per_token", "step_time",
    "throughput", "verdict", "with_overrides",
    "LOSS_CHUNK_TOKENS", "PUBLISHED", "Published", "autocast_weight_bytes", "compare_published", "gradient_bytes",
    "host_floor_s", "interconnect_gbps", "micro_batch_choices", "ops_per_layer", "predict_published",
    "published_markdown", "resolve", "shard_choice", "staging_bytes",
    "Grid", "GridRow", "MeasuredHours", "MemoryRow", "MemoryTable", "PredictedHours", "RunSummary", "StepPlan",
]
