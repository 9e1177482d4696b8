"""Sweeps: a set of ordinary jobs, one per trial, and the sweep.json that records them.

A sweep is a base run (any submit flag or run-YAML key) and axes (a list of values per key: a grid,
the cartesian product; or ranges drawn `samples` times from a seeded generator). Every trial is a job
like any other: its own run dir, status, logs, cancel. The sweep adds only RUNS/sweeps/<id>-<name>/
sweep.json (the file it came from, the base, the axes, the trial <-> job map), rewritten atomically
after every trial submitted, so an interrupted submit is finished by submitting the same sweep again.

Every trial is checked through the path `submit` takes (ops.build_spec, checked_spec, fit_check)
before anything is queued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import llamajobs.spec
from llamajobs import cluster, estimate, ops, site
from llamajobs.errors import Failure, SpecError
from llamajobs.registry import Job
from llamajobs.site import Site
from llamajobs.spec import JobSpec

SWEEPS_DIR = "sweeps"  # beside the run dirs; not a run dir's name (<id>-<name>), so the registry skips it
SWEEP_FILE = "sweep.json"
MAX_TRIALS = 256
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Keys a sweep file may hold besides these: none (a typo must not pass silently).
FILE_KEYS = ("name", "base", "axes", "samples", "seed", "config")
# JobSpec fields that are not settings (computed, or set by another command), and keys an axis may not vary.
NOT_SETTINGS = llamajobs.spec.RESOLVED | llamajobs.spec.RECORDED
NOT_AXES = {"name": "every trial is named after the sweep", "cluster": "a sweep runs on one cluster"}


# --- the definition: base, axes, how trials are drawn ---


@dataclass(frozen=True, kw_only=True, slots=True)
class Range:
    """An axis drawn at random with --samples: uniform in [low, high], or log-uniform (lr)."""

    low: float
    high: float
    log: bool = False

    def draw(self, rng: random.Random, integer: bool) -> float | int:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        # Four significant digits: trials read well in tables and legends, and stay reproducible.
        return round(value) if integer else float(f"{value:.4g}")

    def to_json(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log}


Axis = tuple[Any, ...] | Range


@dataclass(frozen=True, kw_only=True, slots=True)
class Definition:
    """What a sweep is: two submits of the same definition are the same sweep (its `key`)."""

    name: str = "sweep"
    base: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # JobSpec field -> value
    axes: Mapping[str, Axis] = dataclasses.field(default_factory=dict)  # JobSpec field -> values, in order
    samples: int | None = None  # None: the grid
    seed: int = 0
    config: str | None = None  # a run YAML under the base (submit's --config)
    file: str | None = None  # the sweep file, and its text as it was submitted
    file_text: str | None = None

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise SpecError(f"sweep name {self.name!r} is not allowed; use letters, digits, '.', '_' and '-'")
        if not self.axes:
            raise SpecError("a sweep needs at least one axis: --axis KEY=V1,V2 or `axes:` in the sweep file")
        if self.samples is not None and self.samples < 1:
            raise SpecError(f"--samples {self.samples} must be at least 1")
        for key, axis in self.axes.items():
            if isinstance(axis, Range) and self.samples is None:
                raise SpecError(f"axis {flag(key)}: a range ({axis.low}..{axis.high}) needs --samples N")

    @property
    def key(self) -> str:
        """The identity of the sweep: its base, axes and sampling (not its parallelism or file path)."""
        return hashlib.sha256(json.dumps(self._identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _identity(self) -> dict[str, Any]:
        return {"name": self.name, "base": dict(self.base), "axes": axes_json(self.axes), "samples": self.samples,
                "seed": self.seed, "config": self.config}

    def count(self) -> int:
        return self.samples if self.samples is not None else math.prod(len(a) for a in self.axes.values())

    def trial_values(self, max_trials: int = MAX_TRIALS) -> list[dict[str, Any]]:
        """Each trial's axis values, trial 0 first: the grid in axis order, or `samples` seeded draws."""
        if self.count() > max_trials:
            how = "sample fewer with --samples" if self.samples else "drop values, or sample with --samples N"
            raise SpecError(f"the sweep has {self.count()} trials, above --max-trials {max_trials}; raise "
                            f"--max-trials, or {how}")
        if self.samples is None:
            return [dict(zip(self.axes, combo)) for combo in itertools.product(*self.axes.values())]
        rng = random.Random(self.seed)
        integer = {k for k in self.axes if _kind(k) == "int"}
        return [{k: (a.draw(rng, k in integer) if isinstance(a, Range) else rng.choice(a)) for k, a in self.axes.items()}
                for _ in range(self.samples)]

    def to_json(self) -> dict[str, Any]:
        return {**self._identity(), "file": self.file, "file_text": self.file_text}


def flag(name: str) -> str:
    return name.replace("_", "-")


def _kind(name: str) -> str:
    """A JobSpec field's type without its `| None`: int, float, str, bool, tuple[str, ...]."""
    return str(llamajobs.spec.FIELDS[name].type).split(" |")[0]


def field_name(key: Any, where: str) -> str:
    """A flag name (lora-r) or run-YAML key (lora_r) as the JobSpec field; SpecError for any other."""
    name = str(key).replace("-", "_")
    if name not in llamajobs.spec.FIELDS or name in NOT_SETTINGS:
        allowed = ", ".join(flag(k) for k in llamajobs.spec.FIELDS if k not in NOT_SETTINGS)
        raise SpecError(f"{where}: unknown key {str(key)!r}; allowed (as submit's flags or run-YAML keys): {allowed}")
    return name


def setting(name: str, value: Any, where: str) -> Any:
    """One value as its field's type (the spec's own coercion); `micro_batch: auto` stays as it is."""
    if name == "micro_batch" and str(value).strip().lower() == "auto":
        return "auto"
    try:
        return llamajobs.spec.normalise_keys({name: value}, where)[name]
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None


def base_settings(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        name = field_name(key, where)
        out[name] = setting(name, value, f"{where} {key}")
    return out


def parse_axis(key: Any, values: Any, where: str) -> tuple[str, Axis]:
    """One axis: a list of values, or a range {low, high, log} for --samples."""
    name = field_name(key, where)
    label = f"axis {flag(name)}"
    if name in NOT_AXES:
        raise SpecError(f"{label}: not an axis ({NOT_AXES[name]})")
    if isinstance(values, Mapping):
        unknown = set(values) - {"low", "high", "log"}
        if unknown or "low" not in values or "high" not in values:
            raise SpecError(f"{label}: a range is {{low: L, high: H, log: true|false}}, not {dict(values)!r}")
        try:
            low, high = float(values["low"]), float(values["high"])
        except (TypeError, ValueError):
            raise SpecError(f"{label}: low {values['low']!r} and high {values['high']!r} must be numbers") from None
        log = values.get("log", False)
        if not isinstance(log, bool) or not (math.isfinite(low) and math.isfinite(high)) or low >= high or (
                log and low <= 0):
            raise SpecError(f"{label}: range {low:g}..{high:g} (log {log!r}) needs low < high"
                            + (", both above 0 for log" if log else ""))
        if _kind(name) not in ("int", "float"):
            raise SpecError(f"{label}: a range needs a numeric key; give a list of values")
        return name, Range(low=low, high=high, log=log)
    if not isinstance(values, (list, tuple)) or not values:
        raise SpecError(f"{label}: give a list of values, or a range {{low, high, log}} for --samples")
    typed = [setting(name, v, label) for v in values]
    for i, v in enumerate(typed):
        if v in typed[:i]:
            raise SpecError(f"{label}: {values[i]!r} is listed twice")
    return name, tuple(typed)


def parse_axis_flag(item: str) -> tuple[str, Axis]:
    """--axis KEY=V1,V2,... ; KEY=LOW..HIGH or KEY=log:LOW..HIGH is a range (for --samples)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip() or not text.strip():
        raise SpecError(f"--axis {item!r}: use KEY=V1,V2,... (or KEY=LOW..HIGH, KEY=log:LOW..HIGH with --samples)")
    key, text = key.strip(), text.strip()
    name = field_name(key, f"--axis {item}")
    if _kind(name).startswith("tuple"):
        raise SpecError(f"--axis {key}: its values are lists themselves; give this axis in a sweep file's `axes:`")
    log = text.startswith("log:")
    low, dots, high = text.removeprefix("log:").partition("..")
    if dots:
        return parse_axis(key, {"low": low, "high": high, "log": log}, "--axis")
    return parse_axis(key, [v.strip() for v in text.split(",")], "--axis")


def axes_json(axes: Mapping[str, Axis]) -> dict[str, Any]:
    return {k: a.to_json() if isinstance(a, Range) else list(a) for k, a in axes.items()}


def read_file(path: Path) -> dict[str, Any]:
    """A sweep file's parts, as Definition's fields: name, base (submit's flags or run-YAML keys),
    axes, samples, seed, config. Checked as a whole once the command line is merged in."""
    data = site.read_yaml(path, "sweep file")
    unknown = [k for k in data if k not in FILE_KEYS]
    if unknown:
        raise SpecError(f"sweep file {path}: unknown key {unknown[0]!r}; allowed: {', '.join(FILE_KEYS)}")
    base, axes = data.get("base") or {}, data.get("axes") or {}
    if not isinstance(base, Mapping) or not isinstance(axes, Mapping):
        raise SpecError(f"sweep file {path}: `base` and `axes` must be mappings of keys to values")
    for key in ("samples", "seed"):
        if data.get(key) is not None and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            raise SpecError(f"sweep file {path}: {key} {data[key]!r} is not a whole number")
    base = base_settings(base, f"sweep file {path}: base")
    return {"name": str(data.get("name") or base.pop("name", None) or path.stem), "base": base,
            "axes": dict(parse_axis(k, v, f"sweep file {path}") for k, v in axes.items()),
            "samples": data.get("samples"), "seed": data.get("seed") or 0,
            "config": _config(data["config"], path.parent) if data.get("config") else None,
            "file": str(path.absolute()), "file_text": path.read_text(encoding="utf-8")}


def definition(file: str | None, flags: Mapping[str, Any], axis_flags: Sequence[str], samples: int | None,
               seed: int | None, config: str | None) -> Definition:
    """The sweep file (if any) with the command line over it: flags over its base, --axis over its
    axes, --name (the sweep's name, and its trials' prefix) over its name."""
    found = read_file(Path(file)) if file else {"name": "sweep", "base": {}, "axes": {}, "samples": None, "seed": 0}
    if seed is not None and samples is None and not found["samples"]:
        raise SpecError(f"--seed {seed} seeds the draws of --samples N; a run's own seed is an axis "
                        f"(--axis seed={seed}) or the sweep file's base (seed: {seed})")
    base = {**found["base"], **base_settings(flags, "flags")}
    return Definition(**{**found, "name": base.pop("name", None) or found["name"], "base": base,
                         "axes": {**found["axes"], **dict(parse_axis_flag(a) for a in axis_flags)},
                         "samples": samples if samples is not None else found["samples"],
                         "seed": seed if seed is not None else found["seed"],
                         "config": _config(config, Path.cwd()) if config else found.get("config")})


def _config(value: str, folder: Path) -> str:
    """A run YAML's absolute path (recorded, so a resubmission from elsewhere finds it), or a preset's name."""
    path = Path(folder, value)
    return str(path.absolute()) if path.exists() else str(value)


# --- the recorded sweep ---


@dataclass(frozen=True, kw_only=True, slots=True)
class Trial:
    trial: int
    values: Mapping[str, Any]  # axis (JobSpec field) -> value
    job: int | None = None  # None until submitted

    def label(self) -> str:
        return " ".join(f"{flag(k)}={v:g}" if isinstance(v, float) else f"{flag(k)}={_text(v)}"
                        for k, v in self.values.items())


def _text(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class Sweep:
    id: int
    dir: Path
    definition: Definition
    trials: tuple[Trial, ...]
    max_parallel: int | None = None
    created: float = 0.0

    @property
    def name(self) -> str:
        return self.definition.name

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.definition.key, **self.definition.to_json(),
                "max_parallel": self.max_parallel, "created": self.created,
                "trials": [{"trial": t.trial, "values": dict(t.values), "job": t.job} for t in self.trials]}

    def with_job(self, trial: int, job: int) -> Sweep:
        trials = tuple(dataclasses.replace(t, job=job) if t.trial == trial else t for t in self.trials)
        return dataclasses.replace(self, trials=trials)


def sweeps_dir(runs: Path) -> Path:
    return runs / SWEEPS_DIR


def save(sweep: Sweep) -> None:
    """sweep.json, written to a temporary file and renamed: a reader never sees half of it."""
    tmp = sweep.dir / f"{SWEEP_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(sweep.to_json(), indent=2, default=list) + "\n")
    os.replace(tmp, sweep.dir / SWEEP_FILE)


def load_dir(folder: Path) -> Sweep:
    """A sweep dir's sweep.json; Failure naming the file when it is missing or damaged."""
    path = folder / SWEEP_FILE
    try:
        data = json.loads(path.read_text())
        axes = {k: Range(**v) if isinstance(v, dict) else tuple(tuple(x) if isinstance(x, list) else x for x in v)
                for k, v in data["axes"].items()}
        found = Definition(name=data["name"], base=data["base"], axes=axes, samples=data["samples"],
                           seed=data["seed"], config=data["config"], file=data["file"], file_text=data["file_text"])
        trials = tuple(Trial(trial=t["trial"], values={k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in t["values"].items()}, job=t["job"])
                       for t in data["trials"])
        return Sweep(id=int(data["id"]), dir=folder, definition=found, trials=trials,
                     max_parallel=data.get("max_parallel"), created=data.get("created", 0.0))
    except OSError as e:
        raise Failure(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise Failure(f"{path}: damaged ({type(e).__name__}: {e})") from None


def _sweep_dirs(runs: Path) -> list[Path]:
    folder = sweeps_dir(runs)
    if not folder.is_dir():
        return []
    return sorted((d for d in folder.iterdir() if d.is_dir() and d.name.partition("-")[0].isdigit()),
                  key=lambda d: int(d.name.partition("-")[0]))


def find(runs: Path, ref: str) -> Sweep:
    """A sweep by its id or its name (the newest of that name)."""
    dirs = _sweep_dirs(runs)
    matches = [d for d in dirs if d.name.partition("-")[0] == ref] if ref.isdigit() else \
        [d for d in dirs if d.name.partition("-")[2] == ref]
    if not matches:
        known = ", ".join(d.name for d in dirs) or "none"
        raise SpecError(f"sweep {ref!r} is not known in {sweeps_dir(runs)}; known: {known}")
    return load_dir(matches[-1])


def existing(runs: Path, key: str) -> Sweep | None:
    """The sweep with this definition, if one was submitted before (the newest)."""
    for folder in reversed(_sweep_dirs(runs)):
        try:
            found = load_dir(folder)
        except Failure:  # a damaged sweep.json is not this sweep; `sweep status` names the damage
            continue
        if found.definition.key == key:
            return found
    return None


def create(runs: Path, found: Definition, values: list[dict[str, Any]], max_parallel: int | None) -> Sweep:
    """A new sweep dir, its id claimed by an atomic mkdir (as job ids are), and its first sweep.json."""
    folder = sweeps_dir(runs)
    folder.mkdir(parents=True, exist_ok=True)
    candidate = max((int(d.name.partition("-")[0]) for d in _sweep_dirs(runs)), default=0) + 1
    while True:
        try:
            (folder / f"{candidate}-{found.name}").mkdir()
            break
        except FileExistsError:
            candidate += 1
    made = Sweep(id=candidate, dir=folder / f"{candidate}-{found.name}", definition=found, max_parallel=max_parallel,
                 trials=tuple(Trial(trial=i, values=v) for i, v in enumerate(values)), created=time.time())
    save(made)
    return made


# --- checking and estimating every trial before anything is queued ---


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialEstimate:
    trial: int
    label: str
    hours_per_epoch: float | None
    hours: float | None  # the whole run: --max-steps steps, or --epochs epochs
    gpus: int
    gpu_hours: float | None
    gpu_mem_gib: float | None
    verdict: str | None  # fits / tight / does not fit; None when not estimated
    note: str = ""  # why not, when not estimated

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class Estimate:
    trials: tuple[TrialEstimate, ...]
    max_parallel: int
    gpu: str | None  # the GPU assumed; None when no trial runs on GPUs
    gpu_note: str = ""

    @property
    def gpu_hours(self) -> float | None:
        known = [t.gpu_hours for t in self.trials]
        return sum(known) if known and None not in known else None

    @property
    def wall_hours(self) -> float | None:
        """The trials in order, each started in the first of K slots to come free."""
        if not self.trials or any(t.hours is None for t in self.trials):
            return None
        slots = [0.0] * min(self.max_parallel, len(self.trials))
        for t in self.trials:
            slots[slots.index(min(slots))] += t.hours
        return max(slots)

    def to_json(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "max_parallel": self.max_parallel, "gpu_hours": self.gpu_hours,
                "wall_hours": self.wall_hours, "trials": [t.to_json() for t in self.trials]}


def estimate_trial(trial: Trial, spec: JobSpec, fit: ops.FitCheck) -> TrialEstimate:
    """Hours and memory of a trial from the estimator, on the GPU submit's fit check assumed."""
    label = trial.label()
    if fit.accelerator is None:
        return TrialEstimate(trial=trial.trial, label=label, hours_per_epoch=None, hours=None, gpus=0, gpu_hours=None,
                             gpu_mem_gib=None, verdict=None, note=f"{spec.cluster} cluster on CPU: not estimated")
    planned = fit.spec or spec
    h = estimate.hours(planned, fit.accelerator, node_ram_gib=ops.node_ram_gib(planned))
    gpus = planned.nodes * planned.gpus_per_node
    if planned.max_steps is not None:
        total = planned.max_steps * h.step_s / 3600
    elif h.hours_per_epoch is not None:
        total = planned.epochs * h.hours_per_epoch
    else:
        total = None
    return TrialEstimate(trial=trial.trial, label=label, hours_per_epoch=h.hours_per_epoch, hours=total, gpus=gpus,
                         gpu_hours=total * gpus if total is not None else None, gpu_mem_gib=h.gpu_mem_gib,
                         verdict=h.verdict,
                         note="" if total is not None else "hours need --tokens-per-epoch or --max-steps")


@dataclass(frozen=True, kw_only=True, slots=True)
class Planned:
    """One trial as submit would queue it: its spec (auto choices resolved), fit check and estimate."""
    trial: Trial
    spec: JobSpec
    fit: ops.FitCheck
    estimate: TrialEstimate


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    definition: Definition
    trials: tuple[Planned, ...]
    profile: Site
    estimate: Estimate
    warnings: tuple[str, ...] = ()


def plan(found: Definition, runs: Path, *, gpu: str | None = None, force: bool = False, dry_run: bool = False,
         max_parallel: int | None = None, max_trials: int = MAX_TRIALS, cluster_default: str | None = None) -> Plan:
    """Every trial built and checked as `submit` builds and checks a run; SpecError naming the first
    trial refused (a bad value, a rule it breaks, a run that does not fit), so nothing is queued."""
    planned, warnings, profile = [], [], None
    for i, values in enumerate(found.trial_values(max_trials)):
        trial = Trial(trial=i, values=values)
        flags = {**found.base, **values, "name": f"{found.name}-{i}"}
        try:
            spec, profile = ops.build_spec(flags, found.config, cluster_default=cluster_default)
            spec = ops.checked_spec(spec, runs)
            fit = ops.fit_check(spec, gpu, force, dry_run)
        except SpecError as e:
            raise SpecError(f"trial {i} ({trial.label()}): {e}") from None
        if fit.warning:
            warnings.append(f"trial {i} ({trial.label()}): {fit.warning}")
        planned.append(Planned(trial=trial, spec=fit.spec or spec, fit=fit, estimate=estimate_trial(trial, spec, fit)))
    accel = next((p.fit.accelerator for p in planned if p.fit.accelerator is not None), None)
    note = next((p.fit.note for p in planned if p.fit.note), "")
    k = max_parallel or len(planned)
    return Plan(definition=found, trials=tuple(planned), profile=profile, warnings=tuple(warnings),
                estimate=Estimate(trials=tuple(p.estimate for p in planned), max_parallel=k,
                                  gpu=accel.name if accel else None, gpu_note=note))


# --- submitting ---


@dataclass(frozen=True, kw_only=True, slots=True)
class Submitted:
    sweep: Sweep
    submitted: tuple[int, ...]  # the trials queued by this call (earlier ones kept their jobs)
    estimate: Estimate

    def to_json(self) -> dict[str, Any]:
        return {"sweep": self.sweep.id, "dir": str(self.sweep.dir),
                "trials": [{"trial": t.trial, "job": t.job, **dict(t.values)} for t in self.sweep.trials],
                "submitted": list(self.submitted), "estimate": self.estimate.to_json()}


def submit(checked: Plan, runs: Path, max_parallel: int | None = None) -> Submitted:
    """Queue every trial that has no job yet (all of them, unless this sweep was submitted before).

    --max-parallel K: each new trial waits for the K-th trial before it among those still queued or
    running (ended ones hold no slot), however that one ends; so at most K run at once."""
    found = checked.definition
    sweep = existing(runs, found.key)
    if sweep is None:
        sweep = create(runs, found, [p.trial.values for p in checked.trials], max_parallel)
    else:
        sweep = dataclasses.replace(sweep, max_parallel=max_parallel)
    jobs = {t.trial: t.job for t in sweep.trials}
    live = _live_jobs(runs, [j for j in jobs.values() if j is not None])
    done = []
    for p in checked.trials:
        if jobs.get(p.trial.trial) is not None:
            continue
        wait_for = (live[-max_parallel],) if max_parallel and len(live) >= max_parallel else ()
        result = ops.submit_job(p.spec, checked.profile, runs, p.fit, after_any=wait_for)
        sweep = sweep.with_job(p.trial.trial, result.job.id)
        save(sweep)  # after each: a submit interrupted here is finished by submitting again
        live.append(result.job)
        done.append(p.trial.trial)
    save(sweep)
    return Submitted(sweep=sweep, submitted=tuple(done), estimate=checked.estimate)


def _live_jobs(runs: Path, ids: list[int]) -> list[Job]:
    """Those of the jobs still queued or running, in id order (the order they were submitted)."""
    rows = ops.job_rows(runs, ids)
    return [ops.find_job(runs, r.id) for r in sorted(rows.values(), key=lambda r: r.id)
            if r.state not in cluster.TERMINAL]


def cancel(runs: Path, ref: str) -> tuple[Sweep, list[Trial]]:
    """Cancel every trial still queued or running, and nothing else: the trials cancelled. The last
    first, so that cancelling one does not release a trial waiting for its slot."""
    sweep = find(runs, ref)
    rows = ops.job_rows(runs, [t.job for t in sweep.trials if t.job is not None])
    done = []
    for t in reversed(sweep.trials):
        if t.job in rows and rows[t.job].state not in cluster.TERMINAL:
            try:
                ops.cancel(runs, t.job)
            except Failure:  # it ended meanwhile
                continue
            done.append(t)
    return sweep, done[::-1]
