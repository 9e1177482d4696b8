"""Every rule on a JobSpec's values, the worker's included: what passes here the worker runs (it checks
only what the node alone can tell: the GPUs and processes it finds, the files it reads). The JobSpec
(spec.py) calls validate() when it is made; the types of its fields were checked there already.
Rules between flags come from the catalog's facts (strategies, modes, families), not from names."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from llamajobs import catalog
from llamajobs.errors import SpecError
from llamajobs.values import DEVICES, flag as _flag, parse_slurm_time

if TYPE_CHECKING:
    from llamajobs.spec import DebugSpec, EvalSpec, JobSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WANDB = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # [ENTITY/]PROJECT


def _choice(spec: JobSpec, name: str, allowed: tuple[str, ...] | list[str]) -> None:
    value = getattr(spec, name)
    if value not in allowed:
        raise SpecError(f"{_flag(name)} {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(spec: JobSpec, *names: str) -> None:
    for name in names:
        value = getattr(spec, name)
        if value is not None and value <= 0:
            raise SpecError(f"{_flag(name)} {value} must be positive")


def validate_eval(options: EvalSpec) -> None:
    if options.harness or options.task == "harness":  # lm-eval's tasks: harness.check_tasks knows them
        if options.task != "harness" or not options.harness or options.generate or options.score != "letter":
            raise SpecError("--harness TASK[,TASK] replaces --task, --data, --generate and --score; leave those out")
        if options.batch_size < 1 or (options.limit is not None and options.limit < 1) or options.shots < 0:
            raise SpecError("--batch-size and --limit must be at least 1, --shots 0 or more")
        return
    if options.task not in catalog.TASKS:
        raise SpecError(f"--task {options.task!r} is not known; choose one of {', '.join(catalog.TASKS)}")
    if options.score not in catalog.SCORES:
        raise SpecError(f"--score {options.score!r}; choose one of {', '.join(catalog.SCORES)}")
    if options.shots < 0:
        raise SpecError(f"--shots {options.shots}: must be 0 or more")
    if options.shots and options.shots_file is None:
        raise SpecError(f"--shots {options.shots}: needs --shots-file, a file of solved examples in the "
                        f"--task {options.task} format")
    for name in ("batch_size", "max_new_tokens", "limit"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise SpecError(f"{_flag(name)} {value}: must be at least 1")


def validate_debug(debug: DebugSpec) -> None:
    if debug.fault is not None and debug.fault not in catalog.FAULTS:
        raise SpecError(f"debug.fault {debug.fault!r}: expected one of {', '.join(catalog.FAULTS)}")
    if debug.fault_step < 0:
        raise SpecError(f"debug.fault_step {debug.fault_step} must be 0 or more")
    if debug.slow_checkpoint_write_s < 0:
        raise SpecError(f"debug.slow_checkpoint_write_s {debug.slow_checkpoint_write_s} must be 0 or more")
    if debug.ranks_per_node is not None and debug.ranks_per_node < 1:
        raise SpecError(f"debug.ranks_per_node {debug.ranks_per_node} must be 1 or more")


def validate_shape(shape: catalog.Shape) -> None:
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len", "norm_eps",
                 "rope_theta"):
        if getattr(shape, name) <= 0:
            raise SpecError(f"model_shape.{name} {getattr(shape, name)} must be positive")
    if (shape.explicit_head_dim is None and shape.dim % shape.n_heads) or shape.n_heads % shape.n_kv_heads:
        raise SpecError(f"model_shape: hidden size {shape.dim}, {shape.n_heads} heads and {shape.n_kv_heads} kv "
                        "heads do not divide; not a LLaMA shape")
    if shape.family not in catalog.FAMILIES:
        raise SpecError(f"model_shape.family {shape.family!r}; supported: {', '.join(catalog.FAMILIES)}")


def validate(spec: JobSpec) -> None:
    """Every rule on the spec's values, the worker's included: what passes here the worker runs (it
    checks only what the node alone can tell: the GPUs and processes it finds, the files it reads)."""
    _choice(spec, "strategy", catalog.STRATEGIES)
    _choice(spec, "mode", catalog.MODES)
    _choice(spec, "cluster", list(catalog.CLUSTER))
    _choice(spec, "launcher", catalog.LAUNCHERS)
    _choice(spec, "device", DEVICES)
    _choice(spec, "kernels", catalog.KERNELS)
    _choice(spec, "objective", catalog.OBJECTIVES)
    _choice(spec, "loss", catalog.DPO_LOSSES)
    _choice(spec, "shard_within", catalog.SHARD_WITHIN)
    if spec.model_shape is not None:
        validate_shape(spec.model_shape)
    elif spec.size not in catalog.SIZES:
        raise SpecError(f"--size {spec.size!r} is not known; choose one of {', '.join(catalog.SIZES)}")
    if not re.match(r"^\d+[KMGT]?$", spec.mem_per_node):
        raise SpecError(f"--mem-per-node {spec.mem_per_node!r} is malformed; use SLURM's syntax: 0 (all), 500G, 64000")
    _positive(spec, "nodes", "gpus_per_node", "cpus_per_node", "procs_per_node", "seq_len", "global_batch", "micro_batch",
              "lr", "epochs", "max_steps", "tokens_per_epoch", "checkpoint_every_steps",
              "checkpoint_every_minutes", "keep_checkpoints", "lora_r", "lora_alpha", "num_virtual_tokens",
              "log_every_steps", "collective_timeout_minutes")
    _positive(spec, "eval_every_steps")
    _positive(spec, "eval_batches")
    if spec.name is not None and not _NAME.match(spec.name):
        raise SpecError(f"--name {spec.name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-'")
    if spec.wandb is not None and not _WANDB.match(spec.wandb):
        raise SpecError(f"--wandb {spec.wandb!r} is not allowed; give PROJECT or ENTITY/PROJECT in letters, "
                        "digits, '.', '_' or '-'")
    if spec.max_requeues < 0:
        raise SpecError(f"--max-requeues {spec.max_requeues} must be 0 or more")
    if not 0 <= spec.lora_dropout < 1:
        raise SpecError(f"--lora-dropout {spec.lora_dropout} must be in [0, 1)")
    if not 0 <= spec.warmup_ratio < 1:
        raise SpecError(f"--warmup-ratio {spec.warmup_ratio} must be in [0, 1)")
    if spec.weight_decay < 0:
        raise SpecError(f"--weight-decay {spec.weight_decay} must be 0 or more")
    if spec.grad_clip < 0:
        raise SpecError(f"--grad-clip {spec.grad_clip} must be 0 (no clipping) or more")
    _validate_combinations(spec)
    if spec.time is not None:
        parse_slurm_time(spec.time)
    if spec.seq_len > spec.shape.max_seq_len:
        raise SpecError(f"--seq-len {spec.seq_len} exceeds the model's maximum {spec.shape.max_seq_len}")
    if spec.evaluation is None:  # (an eval job has no batch schedule)
        spec.accum_steps()  # refuses a global batch the planned ranks' micro-batches do not divide


def _validate_fp8(spec: JobSpec) -> None:
    """--fp8's rules; the node refuses a card without float8 matmuls (only it knows the card)."""
    if spec.mode_info.frozen_base:
        raise SpecError(f"--fp8 trains a full fine-tune's linears in float8; --mode {spec.mode} keeps the base "
                        "frozen in bf16: leave --fp8 out or use --mode full")
    if not spec.strategy_info.fp8:
        names = ", ".join(s.name for s in catalog.STRATEGY.values() if s.fp8)
        raise SpecError(f"--fp8 is implemented for {names}; leave it out with --strategy {spec.strategy}")
    if not spec.compile:
        raise SpecError("--fp8 needs --compile (torchao's float8 casts are fast only when compiled)")
    if spec.device == "cpu":
        raise SpecError("--fp8 needs an H100-class GPU (float8 matmuls); --device cpu has none: leave --fp8 out")


def _validate_combinations(spec: JobSpec) -> None:
    """The rules between flags (strategy x mode x where it runs), from the catalog's facts."""
    strategy, mode = spec.strategy_info, spec.mode_info
    if mode.adapters and not spec.lora_targets:
        raise SpecError("--lora-targets is empty; name modules such as q_proj,v_proj")
    if spec.merge and not mode.adapters:
        raise SpecError(f"--merge folds LoRA adapters into the base; --mode {spec.mode} has none: leave --merge out")
    if spec.compile and not strategy.compiles:
        names = [s.name for s in catalog.STRATEGY.values() if s.compiles]
        compiling = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise SpecError(f"--compile is implemented for {compiling}; leave it out with --strategy {spec.strategy}")
    if strategy.one_process_per_node and spec.procs_per_node not in (None, 1):
        raise SpecError(f"--strategy {spec.strategy} runs one process per node (it drives all the node's GPUs); "
                        f"leave --procs-per-node out")
    if strategy.one_process_per_node and mode.layer_prefix and spec.plans_gpus and spec.gpus_per_node > 1:
        raise SpecError(f"--mode {spec.mode} with --strategy {spec.strategy} on {spec.gpus_per_node} GPUs: the "
                        "prefix's keys and values would have to follow each layer to its GPU; use --strategy fsdp, "
                        "--gpus-per-node 1 or --device cpu")
    if spec.fp8:
        _validate_fp8(spec)
    _validate_objective(spec)
    where = spec.cluster_info
    if not where.spans_nodes and spec.nodes > 1:
        raise SpecError(f"--nodes {spec.nodes}: the {spec.cluster} cluster has one node; use --cluster "
                        f"{_clusters_that('spans_nodes')}")
    if spec.hold and not where.can_hold:
        raise SpecError(f"--hold needs --cluster {_clusters_that('can_hold')} (cluster is {spec.cluster!r})")
    if spec.sharded_accumulation and not strategy.fsdp:
        raise SpecError(f"sharded_accumulation is FSDP's (DeepSpeed partitions gradients itself); leave it out "
                        f"with --strategy {spec.strategy}")
    if spec.shard_within != "auto" and not strategy.fsdp:
        raise SpecError(f"--shard-within {spec.shard_within} is FSDP's hybrid sharding; leave it out with "
                        f"--strategy {spec.strategy} (or use --strategy fsdp)")
    if spec.launcher == "deepspeed" and not strategy.deepspeed:
        raise SpecError(f"--launcher deepspeed needs a ds-* strategy (strategy is {spec.strategy!r})")
    if spec.procs_per_node and where.allocates_gpus and spec.device != "cpu" \
            and spec.procs_per_node > spec.gpus_per_node:
        raise SpecError(f"--procs-per-node {spec.procs_per_node} exceeds --gpus-per-node {spec.gpus_per_node}")


def _validate_objective(spec: JobSpec) -> None:
    """DPO's settings, and what this increment of it runs (the reference of a LoRA run is its base with
    the adapters disabled; a full fine-tune's frozen copy is not built yet)."""
    if not (math.isfinite(spec.beta) and spec.beta > 0):
        raise SpecError(f"--beta {spec.beta} must be a positive finite number (DPO's default is 0.1)")
    if spec.objective != "dpo":
        given = [f"--{name} {getattr(spec, name)}" for name in ("beta", "loss")
                 if getattr(spec, name) != type(spec).__dataclass_fields__[name].default]
        if given:
            raise SpecError(f"{', '.join(given)}: only with --objective dpo (objective is {spec.objective!r})")
        return
    if spec.mode not in ("lora", "full"):
        raise SpecError(f"--objective dpo trains --mode lora or full, not --mode {spec.mode}")
    if spec.mode == "full" and not spec.strategy_info.fsdp:
        raise SpecError(f"--objective dpo with --mode full keeps a frozen reference copy sharded like the policy; "
                        f"that is implemented for the fsdp strategies, not yet --strategy {spec.strategy}: use "
                        f"--strategy fsdp or --mode lora")
    if spec.strategy_info.one_process_per_node:
        raise SpecError(f"--objective dpo runs under fsdp and ds-* strategies, not --strategy {spec.strategy}")
    if spec.eval_every_steps:
        raise SpecError("--eval-every-steps with --objective dpo: validation of preference pairs is not implemented "
                        "yet; leave --eval-every-steps out")


def validate_objective_data(spec: JobSpec, preference_store: bool) -> None:
    """A preference store trains only with --objective dpo, and dpo only on one (reads no file: the
    caller says what --data is). Not a spec rule: an estimate of a DPO run needs no store."""
    if spec.objective == "dpo" and spec.data is None:
        raise SpecError("--objective dpo needs --data: a store from `llamajobs data prepare --format preference`")
    if spec.objective == "dpo" and not preference_store:
        raise SpecError(f"--objective dpo: --data {spec.data} is not a preference store; prepare one with "
                        f"`llamajobs data prepare --format preference`")
    if spec.objective != "dpo" and preference_store:
        raise SpecError(f"--data {spec.data} holds preference pairs: train on it with --objective dpo")


def _clusters_that(capability: str) -> str:
    """The clusters that have a capability, for a message: "slurm", "slurm or pbs"."""
    return " or ".join(c.name for c in catalog.CLUSTER.values() if getattr(c, capability))


def validate_packing(spec: JobSpec, packed: bool) -> None:
    """A store with a loss mask (instruction and chat data) is packed into rows whose documents must not
    see each other (worker/packing.py: a 4-D block-diagonal mask and positions restarting at 0). peft's
    prompt-learning forward (0.21) cannot carry that: it concatenates a 2-D mask of ones for its virtual
    tokens onto the attention mask (a 4-D one fails there) and drops the position ids (prompt, ptuning),
    so the documents of a row would attend to each other. Refused, on the submitting host and in the worker."""
    if packed and spec.mode_info.virtual_tokens:
        allowed = [m for m, info in catalog.MODE.items() if not info.virtual_tokens]
        raise SpecError(f"--mode {spec.mode} cannot train on --data {spec.data}: its instruction or chat documents are "
                        f"packed into rows, and peft's virtual tokens cannot be kept apart per document; use --mode "
                        f"{' or '.join(allowed)}, or --mode {spec.mode} with plain-text data")
