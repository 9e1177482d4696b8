"""The JobSpec: every setting of a run, validated once, frozen, and the only place defaults live.

Sources, weakest first: these defaults, the site profile, `--config run.yaml`, explicit flags.
spec.json in the run dir is the JobSpec as JSON; the worker reads nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from llamajobs import catalog, files, hub, rules
from llamajobs.errors import SpecError
from llamajobs.values import check_limits, check_text, flag as _flag, parse_count, parse_slurm_time


# Cores asked per worker process when --cpus-per-node is not given (SLURM's default is one per task).
CPUS_PER_WORKER = 4
# spec.json is a few KB; reading it never takes more than this (a damaged or hostile run dir's may be anything)
SPEC_FILE_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalSpec:
    """What an eval job scores: the flags of `llamajobs eval`, with their defaults (the in-process
    eval reads them from here too). Paths are absolute once the CLI has built the spec."""

    model: str  # an HF LLaMA directory, or a LoRA run's final/ (its base found from llamajobs.json)
    task: str
    data: str
    adapter: str | None = None
    shots: int = 0
    shots_file: str | None = None
    generate: bool = False
    score: str = "letter"
    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int = 16
    # lm-evaluation-harness tasks (`eval --harness`): then task is "harness" and data the --tasks-dir ("": none)
    harness: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_types(self, EVAL_FIELDS)
        check_limits(self)
        rules.validate_eval(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class DebugSpec:
    """Switches for tests, like torchtitan's DebugConfig: a section of spec.json (a run YAML's `debug:`),
    validated and printed with the rest. Nothing in the worker reads them from the environment."""

    fault: str | None = None  # one of catalog.FAULTS, injected at optimizer step fault_step (worker/faults.py)
    fault_step: int = 0  # (hang at step 0: after the rendezvous, before joining the process group)
    # DeepSpeed's CPU accelerator answers as on a CPU with bf16 and fp16 instructions (AMD EPYC with
    # avx512_bf16, Xeons with AMX), where its dtype decisions differ from those on a CPU without them.
    simulate_16bit_cpu: bool = False
    # Count every N consecutive ranks as one node (--shard-within node's shard group) instead of the
    # launcher's LOCAL_WORLD_SIZE: a test runs 2 processes of one host as 2 nodes of 1.
    ranks_per_node: int | None = None
    # Each rank's background checkpoint write sleeps this long before writing (a slow filesystem), so
    # that a test sees training go on while a save is in flight. Periodic (background) saves only.
    slow_checkpoint_write_s: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self, DEBUG_FIELDS, prefix="debug.")
        rules.validate_debug(self)

    def fault_at(self, kind: str) -> int | None:
        """The step of the injected fault of this kind, or None."""
        return self.fault_step if self.fault == kind else None

    def describe(self) -> str:
        """What rank 0 prints at start-up when a switch is on ("" when none is)."""
        parts = []
        if self.fault:
            parts.append(f"inject {self.fault} at step {self.fault_step}")
        if self.simulate_16bit_cpu:
            parts.append("DeepSpeed's CPU accelerator simulates bf16/fp16 support")
        if self.ranks_per_node:
            parts.append(f"every {self.ranks_per_node} rank(s) count as one node")
        if self.slow_checkpoint_write_s:
            parts.append(f"background checkpoint writes wait {self.slow_checkpoint_write_s:g} s first")
        return "debug: " + "; ".join(parts) if parts else ""


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    # model
    size: str = "tiny"
    strategy: str = "fsdp"
    mode: str = "full"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    num_virtual_tokens: int = 32
    model_path: str | None = None
    # A Hub id as --model-path: resolved and pinned by `build` (hub.py); model_path is then its snapshot.
    hub_id: str | None = None
    hub_revision: str | None = None
    hub_commit: str | None = None
    hf_home: str | None = None  # site.yaml's hf_home (the cache shared with the nodes); default $HF_HOME
    init_from: str | None = None  # a run's final/ (the CLI resolves a JOB id to its directory)
    # The shape of --init-from's full model, else of --model-path's, read from its config.json when the
    # spec is built (`build`, `with_model_shape`) and stored here, so that reading spec.json later
    # never touches the model (it may have moved). None: the named --size.
    model_shape: catalog.Shape | None = None
    merge: bool = False  # LoRA: also write a merged full model into final/merged
    # data and schedule
    data: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    tokens_per_epoch: int | None = None
    seq_len: int = 512
    global_batch: int = 128
    micro_batch: int = 4
    # --micro-batch auto (the default of `build`, i.e. of every command): the estimator picks the
    # fastest micro-batch that fits for the GPU planned (llamajobs.ops.plan_for_gpu) and records it
    # in micro_batch; this says it was picked. Without a GPU to plan for, the largest of 4, 2, 1 that
    # divides a rank's share of the global batch.
    micro_batch_auto: bool = False
    # FSDP with accumulation: reduce-scatter every micro-batch into the sharded gradient instead of
    # accumulating an unsharded fp32 gradient (4 bytes x every parameter per GPU); the estimator picks
    # it when the unsharded one does not fit.
    sharded_accumulation: bool = False
    # fsdp strategies across nodes: shard each layer within a node and replicate across nodes (HSDP:
    # all-gathers stay on NVLink, one gradient all-reduce per step crosses the network), or over all
    # ranks. auto: the estimator picks the faster layout that fits when the run is planned on GPUs
    # (llamajobs.fit.plan_for_gpu) and records it here with shard_within_auto; a run not planned on
    # GPUs keeps auto, which the worker runs as all.
    shard_within: str = "auto"
    shard_within_auto: bool = False
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    kernels: str = "liger"  # Liger's fused kernels where they run (CUDA, a family it covers); else the plain path
    fp8: bool = False  # torchao's float8 linears (full fine-tunes, fsdp, compiled, H100-class GPUs)
    seed: int = 0
    # the objective: sft (next-token loss on the targets) or dpo (preference pairs; worker/dpo.py)
    objective: str = "sft"
    beta: float = 0.1  # dpo: how far the policy may move from the reference (the KL penalty's weight)
    loss: str = "sigmoid"  # dpo: sigmoid (DPO's) or ipo
    # checkpoints and requeue
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = 60.0
    resume: bool = True  # from checkpoints/latest when there is one
    keep_checkpoints: int = 2
    max_requeues: int = 20
    # How long a collective waits for a rank that went silent before the job fails (and how long, at
    # most 5 minutes, the start-up preflight waits for every rank). Longer than torch's 10 minutes:
    # every rank waits in one while rank 0 alone reads a checkpoint (65B: 130 GB) or writes final/.
    collective_timeout_minutes: float = 30.0
    # where it runs
    cluster: str = "local"
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None
    device: str = "auto"
    launcher: str = "torchrun"
    cpus_per_node: int | None = None  # default: CPUS_PER_WORKER for each worker process
    mem_per_node: str = "0"  # SLURM's --mem; 0 is all of the node's memory (loading and offload live there)
    # SLURM
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    exclude: str | None = None
    mail_user: str | None = None
    mail_type: str | None = None
    after: tuple[str, ...] = ()
    hold: bool = False
    # bookkeeping
    name: str | None = None
    wandb: str | None = None
    log_every_steps: int = 1
    eval_every_steps: int | None = None  # validation loss on the store's eval split every N steps (and at the end)
    eval_batches: int | None = None  # each validation over at most N micro-batches per rank (None: the whole split)
    # what runs: training (None), or an eval of a model (`llamajobs eval --cluster ...`)
    evaluation: EvalSpec | None = None
    debug: DebugSpec = dataclasses.field(default_factory=DebugSpec)  # test switches (run YAML only)

    def __post_init__(self) -> None:
        _check_types(self, FIELDS)
        if self.model_shape is not None:
            _check_types(self.model_shape, SHAPE_FIELDS, prefix="model_shape.")
        check_limits(self)
        rules.validate(self)

    # --- derived values (never stored twice) ---

    @property
    def strategy_info(self) -> catalog.StrategyInfo:
        return catalog.STRATEGY[self.strategy]

    @property
    def rows_per_example(self) -> int:
        """Sequences of seq_len per example of the global batch: DPO's pair is two (chosen, rejected)."""
        return 2 if self.objective == "dpo" else 1

    @property
    def mode_info(self) -> catalog.ModeInfo:
        return catalog.MODE[self.mode]

    @property
    def cluster_info(self) -> catalog.ClusterInfo:
        return catalog.CLUSTER[self.cluster]

    @property
    def liger(self) -> bool:
        """Liger's kernels asked for and covering the model's family (they run only on CUDA, where the
        package is installed: the node decides, worker/kernels.py)."""
        return self.kernels == "liger" and catalog.FAMILIES[self.shape.family].liger

    @property
    def fused_loss(self) -> bool:
        """Liger's fused linear cross-entropy (the logits never exist): not under ZeRO-3, whose head
        weight is a partition outside the head's own forward, nor for DPO, which needs the logits for
        its answers' log-probabilities (worker/dpo.py)."""
        return self.liger and self.strategy_info.zero_stage != 3 and self.objective != "dpo"

    @property
    def async_checkpoints(self) -> bool:
        """Whether periodic saves are written in the background, staging a copy of the saved state in host
        memory: the worker's Strategy.async_checkpoints (DCP's strategies without offload; DeepSpeed's
        engine saves synchronously)."""
        info = self.strategy_info
        periodic = bool(self.checkpoint_every_steps or self.checkpoint_every_minutes)
        return periodic and not info.deepspeed and not info.offload

    @property
    def plans_gpus(self) -> bool:
        """Whether the run is planned on GPUs: --device cuda, or auto on a cluster that allocates GPUs
        (the node decides auto)."""
        return self.device == "cuda" or (self.device == "auto" and self.cluster_info.allocates_gpus)

    @property
    def kind(self) -> str:
        return "train" if self.evaluation is None else "eval"

    @property
    def run_name(self) -> str:
        if self.evaluation is not None:
            return self.name or f"eval-{self.evaluation.task}"
        return self.name or f"{self.size}-{self.mode}-{self.strategy}"

    @property
    def planned_procs_per_node(self) -> int:
        """Processes per node as far as the login node can tell; the worker checks the real count."""
        if self.procs_per_node:
            return self.procs_per_node
        if self.strategy_info.one_process_per_node:
            return 1
        return self.gpus_per_node if self.cluster_info.allocates_gpus and self.device != "cpu" else 2

    @property
    def cpus_per_task(self) -> int:
        """CPUs of the one task per node: its workers, their data loading and CPU Adam."""
        return self.cpus_per_node or CPUS_PER_WORKER * self.planned_procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.planned_procs_per_node

    def accum_steps(self, world_size: int | None = None) -> int:
        """Micro-batches per rank per optimizer step, on world_size ranks: the planned ones by default
        (validation, ds_config.json), the ones the node found in the worker (procs per node are counted
        there). The one place this is computed; refused when the ranks' micro-batches do not divide the
        global batch. (The estimator's Plan prices what-ifs a run would refuse: estimate/plan.py.)"""
        world_size = self.world_size if world_size is None else world_size
        per_step = self.micro_batch * world_size
        accum, rest = divmod(self.global_batch, per_step)
        if rest or not accum:
            raise SpecError(f"--global-batch {self.global_batch} is not divisible by micro-batch {self.micro_batch} x "
                            f"world size {world_size} = {per_step}; use a multiple of {per_step}")
        return accum

    @property
    def time_minutes(self) -> int | None:
        return parse_slurm_time(self.time) if self.time else None

    @property
    def shape(self) -> catalog.Shape:
        """What trains: the model's shape stored when the spec was built, else the named size (a spec.json
        of an earlier version has none stored; its shape is never read from the model's files here)."""
        return self.model_shape or catalog.SIZES[self.size]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False) + "\n"  # strict JSON: never NaN

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec.json is not valid JSON ({e.msg}, line {e.lineno})") from None
        except RecursionError:
            raise SpecError("spec.json is nested too deeply to be a spec") from None
        return from_mapping(values)

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        """spec.json, and no other file (OSError when it cannot be read; SpecError when it is no spec)."""
        try:
            text = files.read_text(path, SPEC_FILE_BYTES)  # a FIFO or a device in its place: OSError, no hang
        except UnicodeDecodeError:
            raise SpecError(f"{path} is not UTF-8 text") from None
        return cls.from_json(text)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(JobSpec)}
EVAL_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(EvalSpec)}
SHAPE_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(catalog.Shape)}
DEBUG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(DebugSpec)}
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def default(name: str) -> Any:
    field = FIELDS[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # (debug: a factory)



def _kind(field: dataclasses.Field) -> str:
    return str(field.type).split(" |")[0]


def _coerce(name: str, value: Any) -> Any:
    """A value from YAML, JSON or a flag, as the field's type; SpecError naming the flag when it is not one.
    Lists, mappings and bytes never become a string or a number by accident."""
    if value is None:
        return None
    sections = {"evaluation": (EvalSpec, eval_from_mapping), "model_shape": (catalog.Shape, shape_from_mapping),
                "debug": (DebugSpec, debug_from_mapping)}  # fields that are nested dataclasses
    if name in sections:
        cls, parse = sections[name]
        return value if isinstance(value, cls) else parse(value)
    kind = _kind(FIELDS[name])
    bad = SpecError(f"{_flag(name)} {value!r} is not a valid {kind.replace('tuple[str, ...]', 'list of names')}")
    scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    try:
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
                raise bad
            return tuple(str(v).strip() for v in items if str(v).strip())
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise bad
        if not scalar:
            raise bad
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return parse_count(value, _flag(name)) if name == "tokens_per_epoch" else int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except SpecError:  # parse_count's own words (a count beyond its bound)
        raise
    except (TypeError, ValueError, OverflowError):
        raise bad from None


def shape_from_mapping(values: Any) -> catalog.Shape:
    """A stored model shape (spec.json's model_shape), every field checked for its type."""
    if not isinstance(values, Mapping):
        raise SpecError(f"model_shape {values!r} is not a mapping of a model's shape")
    unknown = [k for k in values if k not in SHAPE_FIELDS]
    if unknown:
        raise SpecError(f"model_shape: unknown key {str(unknown[0])!r}; allowed: {', '.join(SHAPE_FIELDS)}")
    missing = [name for name, f in SHAPE_FIELDS.items() if f.default is dataclasses.MISSING and name not in values]
    if missing:
        raise SpecError(f"model_shape: no {missing[0]!r}; a stored shape has {', '.join(SHAPE_FIELDS)}")
    return catalog.Shape(**values)


def _check_types(obj: Any, fields: Mapping[str, dataclasses.Field], prefix: str = "") -> None:
    """Each field holds its annotated type (a spec built in code skips _coerce): SpecError naming it
    as its flag (or, with a prefix, as the key of spec.json's model_shape)."""
    for name, field in fields.items():
        value, kind = getattr(obj, name), str(field.type)
        if value is None and "None" in kind:
            continue
        base = _kind(field)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "tuple[str, ...]": isinstance(value, tuple) and all(isinstance(v, str) for v in value),
            "catalog.Shape": isinstance(value, catalog.Shape),
            "EvalSpec": isinstance(value, EvalSpec),
            "DebugSpec": isinstance(value, DebugSpec),
        }.get(base, True)
        label = prefix + name if prefix else _flag(name)
        if not ok:
            raise SpecError(f"{label} {value!r} is not a valid {base}")
        if base == "float" and not math.isfinite(value):
            raise SpecError(f"{label} {value!r} is not a finite number")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, str):
                check_text(label, item)


# Fields that spec.json records but no source sets: the command sets `evaluation` (`llamajobs eval
# --cluster`), the estimator `micro_batch_auto` (--micro-batch auto), `sharded_accumulation` and
# `shard_within_auto` (--shard-within auto).
RECORDED = frozenset({"evaluation", "micro_batch_auto", "sharded_accumulation", "shard_within_auto"})
# Fields resolved at submit (--model-path's Hub id pinned to a commit, the shape read from config.json),
# and settings a run YAML or the site profile gives that have no flag (hf_home: site.yaml's cache).
RESOLVED = frozenset({"hub_id", "hub_revision", "hub_commit", "model_shape"})
YAML_ONLY = frozenset({"grad_clip", "debug", "hf_home"})


def normalise_keys(values: Mapping[str, Any], source: str, settings: bool = False) -> dict[str, Any]:
    """Keys as the flags spell them (global-batch) or as fields (global_batch); unknown keys refused,
    and (settings: a site profile, a run YAML) the RECORDED ones too."""
    out = {}
    known = [k for k in FIELDS if not (settings and k in RECORDED)]
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SpecError(f"{source}: unknown key {str(key)!r}; allowed: "
                            f"{', '.join(k.replace('_', '-') for k in known)}")
        out[name] = _coerce(name, value)
    return out


def from_mapping(values: Mapping[str, Any]) -> JobSpec:
    """A JobSpec from spec.json's mapping: no file is read (the model's shape is stored in it)."""
    if not isinstance(values, Mapping):
        raise SpecError(f"spec: expected a mapping of keys to values, not {type(values).__name__}")
    return JobSpec(**normalise_keys(values, "spec"))


def eval_from_mapping(values: Any) -> EvalSpec:
    """An EvalSpec from spec.json or a run YAML (keys as fields or as eval's flags spell them)."""
    if not isinstance(values, Mapping):
        raise SpecError(f"evaluation {values!r} is not a mapping; give eval's settings as keys (task, data, model, ...)")
    fields = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in EVAL_FIELDS:
            raise SpecError(f"evaluation: unknown key {str(key)!r}; allowed: {', '.join(EVAL_FIELDS)}")
        fields[name] = tuple(value) if name == "harness" and isinstance(value, list) else value
    missing = [name for name in ("model", "task", "data") if fields.get(name) is None]
    if missing:
        raise SpecError(f"evaluation: no {missing[0]!r}; an eval job needs model, task and data")
    return EvalSpec(**fields)


def debug_from_mapping(values: Any) -> DebugSpec:
    """spec.json's or a run YAML's debug section."""
    if not isinstance(values, Mapping):
        raise SpecError(f"debug {values!r} is not a mapping; give its switches as keys ({', '.join(DEBUG_FIELDS)})")
    unknown = [k for k in values if str(k).replace("-", "_") not in DEBUG_FIELDS]
    if unknown:
        raise SpecError(f"debug: unknown key {str(unknown[0])!r}; allowed: {', '.join(DEBUG_FIELDS)}")
    return DebugSpec(**{str(k).replace("-", "_"): v for k, v in values.items()})


def read_model_shape(model_path: str | None, init_from: str | None) -> catalog.Shape | None:
    """The shape of the model a run starts from, read from its config.json: --init-from's when it
    holds a full model, else --model-path's; None for the named size. The one place a spec reads files."""
    try:
        full_init = init_from if init_from and (Path(init_from) / "config.json").is_file() else None
        path = full_init or model_path
        return catalog.shape_for("", path) if path else None
    except ValueError as e:
        raise SpecError(str(e)) from None
    except OSError as e:  # a name too long, a directory that cannot be listed
        raise SpecError(f"--model-path {model_path} / --init-from {init_from}: cannot be read ({e.strerror})") from None


def with_model_shape(spec: JobSpec) -> JobSpec:
    """The spec with its model's shape read again (after --init-from was resolved to a directory)."""
    return dataclasses.replace(spec, model_shape=read_model_shape(spec.model_path, spec.init_from))


def build(flags: Mapping[str, Any], config: Mapping[str, Any] | None = None,
          site: Mapping[str, Any] | None = None) -> JobSpec:
    """Merge the sources (explicit flags win over the run YAML, which wins over the site profile) and
    store the shape of the model the run starts from.

    `flags` holds only what the user typed: click's defaults must not shadow the lower sources.
    """
    merged: dict[str, Any] = {}
    auto = True  # --micro-batch auto unless a source names a number
    for source, values in (("site profile", site or {}), ("--config", config or {}), ("flags", flags)):
        values = dict(values)
        for key in ("micro_batch", "micro-batch"):
            if key in values:
                auto = str(values[key]).strip().lower() == "auto"
                if auto:
                    del values[key]
                    merged.pop("micro_batch", None)
        merged.update(normalise_keys(values, source, settings=source != "flags"))
    mode = merged.get("mode", default("mode"))
    info = catalog.MODE.get(mode)
    # These two rules need to know what was given, which a JobSpec (holding defaults) cannot tell.
    if info is not None and not info.adapters:
        given = [k for k in LORA_FIELDS if k in merged and merged[k] != default(k)]
        if given:
            raise SpecError(f"{_flag(given[0])} needs --mode lora (mode is {mode!r})")
    if info is not None and not info.virtual_tokens and merged.get(
            "num_virtual_tokens", default("num_virtual_tokens")) != default("num_virtual_tokens"):
        raise SpecError(f"--num-virtual-tokens needs --mode {', '.join(catalog.PROMPT_MODES[:-1])} or "
                        f"{catalog.PROMPT_MODES[-1]} (mode is {mode!r})")
    for name in ("model_path", "init_from"):  # refused here, before a file is read
        if isinstance(merged.get(name), str):
            check_text(_flag(name), merged[name])
    merged.update(hub.recorded(merged))  # a Hub id as --model-path: resolved, pinned, recorded
    if "model_shape" in merged:
        raise SpecError("model_shape is not a setting: it is read from the config.json of --model-path or --init-from")
    merged["model_shape"] = read_model_shape(merged.get("model_path"), merged.get("init_from"))
    if merged["model_shape"] is not None and "lora_targets" not in merged:  # LoRA's targets: the family's default
        merged["lora_targets"] = catalog.FAMILIES[merged["model_shape"].family].lora_targets
    if not auto or merged.get("evaluation") is not None:
        return JobSpec(**merged)
    return with_auto_micro_batch(JobSpec(**{**merged, "micro_batch": 1}))


def with_auto_micro_batch(spec: JobSpec, micro_batch: int | None = None) -> JobSpec:
    """--micro-batch auto: `micro_batch` as picked (the estimator's, for a GPU), else the largest of 4,
    2 and 1 that divides a rank's share of the global batch (a run without a GPU to plan for)."""
    per_rank = spec.global_batch // spec.world_size
    chosen = micro_batch or next(m for m in (4, 2, 1) if per_rank % m == 0)
    return dataclasses.replace(spec, micro_batch=chosen, micro_batch_auto=True)
