"""The run being estimated: a `Plan` is what the estimate needs to know of a JobSpec (its FLOPs per
token are the catalog's, shared with the worker)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llamajobs import catalog
from llamajobs.catalog import Shape
from llamajobs.spec import CPUS_PER_WORKER, JobSpec


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What the estimate needs to know about a run, every field given: `Plan.from_spec` takes them from
    a JobSpec (the only place defaults live). The published anchors start from a spec and replace what
    a JobSpec would refuse (shapes, batches)."""

    shape: Shape
    strategy: str
    mode: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int | None  # None: one per GPU (the strategy's one per node for pp)
    seq_len: int
    global_batch: int
    micro_batch: int
    recompute: bool
    compile: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    num_virtual_tokens: int
    cpus_per_node: int | None  # cores CPU Adam gets; None: CPUS_PER_WORKER per worker process (JobSpec's)
    weights_from_disk: bool  # --model-path: a 16-bit checkpoint is read, else fp32 random init
    tokens_per_epoch: int | None
    # FSDP with accumulation: reduce-scatter every micro-batch into the sharded gradient, instead of
    # keeping an unsharded fp32 one until the last (the JobSpec's choice; `planning.resolve` makes it).
    sharded_accumulation: bool
    micro_batch_auto: bool  # --micro-batch auto: `planning.resolve` picks the fastest that fits
    # fsdp across nodes: "node" shards within a node and replicates across nodes (HSDP), "all" over
    # every rank; "auto": `planning.resolve` picks (priced as "all" until it does)
    shard_within: str
    async_checkpoints: bool  # periodic saves staged in host memory and written in the background
    fused_loss: bool  # Liger's fused linear cross-entropy on the GPUs (--kernels liger): no logits tensor
    objective: str  # dpo: two rows per example (chosen, rejected) and the reference's forward

    @classmethod
    def from_spec(cls, spec: JobSpec, **changes: Any) -> Plan:
        """The plan of a JobSpec as it would run on a cluster's GPUs (one process per GPU), with `changes`."""
        plan = cls(shape=spec.shape, strategy=spec.strategy, mode=spec.mode, nodes=spec.nodes,
                   gpus_per_node=spec.gpus_per_node, procs_per_node=spec.procs_per_node, seq_len=spec.seq_len,
                   global_batch=spec.global_batch, micro_batch=spec.micro_batch,
                   recompute=spec.activation_checkpointing, compile=spec.compile, lora_r=spec.lora_r,
                   lora_targets=tuple(spec.lora_targets), num_virtual_tokens=spec.num_virtual_tokens,
                   cpus_per_node=spec.cpus_per_node, weights_from_disk=bool(spec.model_path),
                   tokens_per_epoch=spec.tokens_per_epoch,
                   sharded_accumulation=spec.sharded_accumulation,
                   micro_batch_auto=spec.micro_batch_auto, shard_within=spec.shard_within,
                   async_checkpoints=spec.async_checkpoints, fused_loss=spec.fused_loss, objective=spec.objective)
        return dataclasses.replace(plan, **changes)

    @property
    def strategy_info(self) -> catalog.StrategyInfo:
        return catalog.STRATEGY[self.strategy]

    @property
    def mode_info(self) -> catalog.ModeInfo:
        return catalog.MODE[self.mode]

    @property
    def procs(self) -> int:
        return self.procs_per_node or (1 if self.strategy_info.one_process_per_node else self.gpus_per_node)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        """Ranks that each take a share of the batch (pp: one process per node)."""
        return self.nodes * self.procs

    @property
    def accum(self) -> int:
        """Micro-batches per rank per optimizer step. The plan of a run is the run's (JobSpec.accum_steps,
        which divides: validation refused anything else). A what-if that a run would refuse (another
        strategy's column of the memory table, a local spec priced on a cluster's GPUs) is priced at
        the next whole number of micro-batches rather than dropped from the table."""
        return max(1, math.ceil(self.global_batch / (self.micro_batch * self.data_parallel)))

    @property
    def rows_per_example(self) -> int:
        """Sequences of seq_len per example (per unit of the global and micro batches): DPO's pair is two."""
        return 2 if self.objective == "dpo" else 1

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.rows_per_example * self.seq_len

    @property
    def runs_unsharded(self) -> bool:
        """fsdp in one process without offload: the worker runs the plain model (nobody to shard with)."""
        info = self.strategy_info
        return info.fsdp and not info.offload and self.data_parallel == 1

    @property
    def hybrid(self) -> bool:
        """FSDP2 over a 2-D mesh: each layer sharded over a node's ranks, replicated across the nodes."""
        return (self.strategy_info.fsdp and self.shard_within == "node" and self.nodes > 1
                and not self.runs_unsharded)

    @property
    def shard_ranks(self) -> int:
        """Ranks that one parameter is sharded over (FSDP's shard group; ZeRO-3's partitions)."""
        return self.procs if self.hybrid else self.data_parallel

    @property
    def unsharded_accumulation(self) -> bool:
        """Whether each GPU holds an unsharded fp32 gradient besides its shard between micro-batches."""
        return (self.strategy_info.fsdp and self.accum > 1 and not self.sharded_accumulation
                and not self.runs_unsharded)

    @property
    def accumulation(self) -> str:
        """How gradients add up over micro-batches: "none" (one per step), "sharded" or "unsharded"
        (FSDP, the JobSpec's choice), "deepspeed" (its own buffers), "local" (one unsharded model)."""
        if self.accum == 1:
            return "none"
        if self.strategy_info.fsdp and not self.runs_unsharded:
            return "sharded" if self.sharded_accumulation else "unsharded"
        return "deepspeed" if self.strategy_info.deepspeed else "local"

    @property
    def cpu_cores(self) -> int:
        return self.cpus_per_node or CPUS_PER_WORKER * self.procs

    @property
    def trainable_params(self) -> int:
        """Parameters that get a gradient: all of them, the LoRA adapters, or the virtual tokens."""
        return catalog.trained_params(self.shape, self.mode_info, self.lora_r, self.lora_targets,
                                      self.num_virtual_tokens)


def as_plan(run: Plan | JobSpec) -> Plan:
    return run if isinstance(run, Plan) else Plan.from_spec(run)


def plan_for_strategy(plan: Plan, strategy: str) -> Plan:
    """The same run under another strategy (pp runs one process per node)."""
    one_per_node = catalog.STRATEGY[strategy].one_process_per_node or plan.strategy_info.one_process_per_node
    return dataclasses.replace(plan, strategy=strategy, procs_per_node=None if one_per_node else plan.procs_per_node)
