"""The JobSpec: every setting of a run, validated once, frozen, and the only place defaults live.

Sources, weakest first: these defaults, the site profile, `--config run.yaml`, explicit flags.
spec.json in the run dir is the JobSpec as JSON; the worker reads nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from llamajobs import catalog, hub
from llamajobs.errors import SpecError
from llamajobs.values import check_text, flag as _flag, parse_count, parse_slurm_time


# Cores asked per worker process when --cpus-per-node is not given (SLURM's default is one per task).
CPUS_PER_WORKER = 4


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

    def __post_init__(self) -> None:
        _check_types(self, EVAL_FIELDS)
        validate_eval(self)


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
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
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
    # what runs: training (None), or an eval of a model (`llamajobs eval --cluster ...`)
    evaluation: EvalSpec | None = None

    def __post_init__(self) -> None:
        _check_types(self, FIELDS)
        validate(self)

    # --- derived values (never stored twice) ---

    @property
    def strategy_info(self) -> catalog.StrategyInfo:
        return catalog.STRATEGY[self.strategy]

    @property
    def mode_info(self) -> catalog.ModeInfo:
        return catalog.MODE[self.mode]

    @property
    def plans_gpus(self) -> bool:
        """Whether the run is planned on GPUs: --device cuda, or auto on SLURM (the node decides auto)."""
        return self.device == "cuda" or (self.device == "auto" and self.cluster == "slurm")

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
        return 2 if self.cluster != "slurm" or self.device == "cpu" else self.gpus_per_node

    @property
    def cpus_per_task(self) -> int:
        """CPUs of the one task per node: its workers, their data loading and CPU Adam."""
        return self.cpus_per_node or CPUS_PER_WORKER * self.planned_procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.planned_procs_per_node

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
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SpecError(f"{path} is not UTF-8 text") from None
        return cls.from_json(text)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(JobSpec)}
EVAL_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(EvalSpec)}
SHAPE_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(catalog.Shape)}
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def default(name: str) -> Any:
    return FIELDS[name].default


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WANDB = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # [ENTITY/]PROJECT
def _kind(field: dataclasses.Field) -> str:
    return str(field.type).split(" |")[0]


def _coerce(name: str, value: Any) -> Any:
    """A value from YAML, JSON or a flag, as the field's type; SpecError naming the flag when it is not one.
    Lists, mappings and bytes never become a string or a number by accident."""
    if value is None:
        return None
    if name == "evaluation":
        return value if isinstance(value, EvalSpec) else eval_from_mapping(value)
    if name == "model_shape":
        return value if isinstance(value, catalog.Shape) else shape_from_mapping(value)
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
        }.get(base, True)
        label = prefix + name if prefix else _flag(name)
        if not ok:
            raise SpecError(f"{label} {value!r} is not a valid {base}")
        if base == "float" and not math.isfinite(value):
            raise SpecError(f"{label} {value!r} is not a finite number")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, str):
                check_text(label, item)


def normalise_keys(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Keys as the flags spell them (global-batch) or as fields (global_batch); unknown keys refused."""
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise SpecError(f"{source}: unknown key {str(key)!r}; allowed: "
                            f"{', '.join(k.replace('_', '-') for k in FIELDS)}")
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
        fields[name] = value
    missing = [name for name in ("model", "task", "data") if fields.get(name) is None]
    if missing:
        raise SpecError(f"evaluation: no {missing[0]!r}; an eval job needs model, task and data")
    return EvalSpec(**fields)


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
    for source, values in (("site profile", site or {}), ("--config", config or {}), ("flags", flags)):
        merged.update(normalise_keys(values, source))
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
    return JobSpec(**merged)


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


def validate_shape(shape: catalog.Shape) -> None:
    _check_types(shape, SHAPE_FIELDS, prefix="model_shape.")
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
    _choice(spec, "cluster", catalog.CLUSTERS)
    _choice(spec, "launcher", catalog.LAUNCHERS)
    _choice(spec, "device", ("auto", "cuda", "cpu"))
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
    per_step = spec.micro_batch * spec.world_size
    if spec.evaluation is None and spec.global_batch % per_step:  # an eval job has no batch schedule
        raise SpecError(
            f"--global-batch {spec.global_batch} is not divisible by micro-batch {spec.micro_batch} x "
            f"world size {spec.world_size} = {per_step}; use a multiple of {per_step}")


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
    if spec.cluster != "slurm" and spec.nodes > 1:
        raise SpecError(f"--nodes {spec.nodes}: the {spec.cluster} cluster has one node; use --cluster slurm")
    if spec.hold and spec.cluster != "slurm":
        raise SpecError(f"--hold needs --cluster slurm (cluster is {spec.cluster!r})")
    if spec.launcher == "deepspeed" and not strategy.deepspeed:
        raise SpecError(f"--launcher deepspeed needs a ds-* strategy (strategy is {spec.strategy!r})")
    if spec.procs_per_node and spec.cluster == "slurm" and spec.device != "cpu" \
            and spec.procs_per_node > spec.gpus_per_node:
        raise SpecError(f"--procs-per-node {spec.procs_per_node} exceeds --gpus-per-node {spec.gpus_per_node}")
