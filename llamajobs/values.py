"""User-given values parsed and checked the same way everywhere: SLURM times, token counts, --device, and
the one rule for text that may reach a script. Below the spec and the site profile, which both use it."""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from typing import Any

from llamajobs.errors import SpecError

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time(value: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) to whole minutes."""
    m = _TIME.match(value.strip())
    if not m:
        raise SpecError(f"--time {value!r} is malformed; use HH:MM:SS, MM, D-HH or D-HH:MM:SS")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        total_s = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(parts) == 3:
        total_s = parts[0] * 3600 + parts[1] * 60 + parts[2]
    elif len(parts) == 2:  # MM:SS
        total_s = parts[0] * 60 + parts[1]
    else:
        total_s = parts[0] * 60
    if (days is None and len(parts) == 3 and (parts[1] > 59 or parts[2] > 59)) or total_s <= 0:
        raise SpecError(f"--time {value!r} is malformed; use HH:MM:SS, MM, D-HH or D-HH:MM:SS")
    return max(1, -(-total_s // 60))


def check_time(value: str) -> int:
    """parse_slurm_time, and SpecError naming the value and the maximum when it is longer than LIMITS allow."""
    minutes, high = parse_slurm_time(value), LIMITS["time_minutes"][1]
    if minutes > high:
        raise SpecError(f"--time {value} is too long; allowed: up to {high // 1440}-00:00:00 ({high:,} minutes)")
    return minutes


_MEMORY = re.compile(r"^(\d+)([KMGT]?)$")


def check_memory(value: str, what: str = "--mem-per-node") -> None:
    """SLURM's --mem (megabytes unless a K, M, G or T suffix) within LIMITS; a malformed one is rules.py's."""
    m = _MEMORY.match(value)
    if m:
        mb = int(m[1]) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m[2]]
        check_limit("mem_per_node_mb", mb, shown=value, what=what)


_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*$")
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(value: str | int, what: str = "--tokens") -> int:
    """'2.5B', '800M', '2500000000' -> an integer count."""
    if isinstance(value, int):
        return value
    m = _COUNT.match(str(value).replace("_", "").replace(",", ""))
    count = float(m.group(1)) * _SCALE[m.group(2).lower()] if m else math.nan
    if not math.isfinite(count):
        raise SpecError(f"{what} {value!r} is not a count; use e.g. 2.5B, 800M or 2500000000")
    check_limit("tokens_per_epoch", count, shown=value, what=what)
    return int(round(count))


# The allowed range of every count and size a user gives (submit's, estimate's and eval's flags, the
# keys of a run YAML or site profile): far beyond any real run, and low enough that nothing planned,
# allocated or multiplied from them runs away before the cluster or the node could refuse it.
# Values below the minimum are refused by rules.py with its own words; check_limit refuses the rest.
LIMITS: dict[str, tuple[int | float, int | float]] = {
    "nodes": (1, 4096),
    "gpus_per_node": (1, 64),
    "procs_per_node": (1, 256),
    "cpus_per_node": (1, 4096),
    "mem_per_node_mb": (0, 2**30),  # 1 PiB; 0 is all of the node's
    "seq_len": (1, 2**20),
    "global_batch": (1, 2**20),
    "micro_batch": (1, 2**16),
    "epochs": (0, 10_000),
    "max_steps": (1, 10**9),
    "tokens_per_epoch": (1, 10**15),  # --tokens too: the largest corpora are ~1.5e13 tokens
    "checkpoint_every_steps": (1, 10**9),
    "checkpoint_every_minutes": (0, 525_600),  # a year
    "keep_checkpoints": (1, 1000),
    "max_requeues": (0, 10_000),
    "lora_r": (1, 65_536),
    "lora_alpha": (1, 10**6),
    "num_virtual_tokens": (1, 65_536),
    "log_every_steps": (1, 10**9),
    "eval_every_steps": (1, 10**9),
    "eval_batches": (1, 10**9),
    "collective_timeout_minutes": (0, 10_080),  # a week
    "time_minutes": (1, 366 * 24 * 60),  # --time: a year (SLURM's own limit is 2**32 minutes)
    # eval's
    "shots": (0, 1000),
    "batch_size": (1, 65_536),
    "limit": (1, 10**9),
    "max_new_tokens": (1, 2**20),
    # estimate's
    "peak_tflops": (0, 10**6),
    "gpu_mem_gib": (0, 10**6),
    "cpu_mem_gib": (0, 10**8),
}
LIMITS["rank"] = (0, LIMITS["nodes"][1] * LIMITS["procs_per_node"][1] - 1)  # logs --rank: a job's processes


def check_limit(name: str, value: int | float, shown: str | None = None, what: str | None = None) -> None:
    """SpecError naming the flag, the value (as the user wrote it: `shown`) and the allowed range when
    the value is above LIMITS[name]'s maximum."""
    low, high = LIMITS[name]
    if value > high:
        unit = " MB" if name.endswith("_mb") else ""
        raise SpecError(f"{what or flag(name)} {shown if shown is not None else value} is too large; "
                        f"allowed: {low:,} to {high:,}{unit}")


DEVICES: tuple[str, ...] = ("auto", "cuda", "cpu")  # --device


def device_type(device: str, cuda_available: bool) -> str:
    """The one rule for --device, wherever a process picks its device (the training worker, kernels,
    eval): "cuda" when asked, refused where there is none, or under auto when there is one; else "cpu"."""
    if device not in DEVICES:
        raise SpecError(f"--device {device!r}; choose {', '.join(DEVICES)}")
    if device == "cuda" and not cuda_available:
        raise SpecError("--device cuda, but there is no usable CUDA device here; use --device auto or cpu")
    return "cuda" if device != "cpu" and cuda_available else "cpu"


def flag(name: str) -> str:
    """A field's name as its command-line flag: global_batch -> --global-batch."""
    return "--" + name.replace("_", "-")


def check_text(what: str, value: str, allowed: str = "") -> None:
    """The one rule for text that may reach a script (an #SBATCH line, launch.sh, a YAML key): no control
    character at all (but those `allowed`). A newline would start a line the shell runs; a carriage
    return, tab, escape or NUL has no business in a name or path either. Quoting is the renderer's job;
    this is the rest."""
    for c in value:
        if unicodedata.category(c) == "Cc" and c not in allowed:
            raise SpecError(f"{what} {value!r} contains a control character ({c!r}); give it on one line, "
                            "without control characters")


def check_limits(spec: Any) -> None:
    """Every count and size of a spec (a JobSpec or an EvalSpec) within LIMITS, before any rule or
    plan multiplies them."""
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if field.name in LIMITS and isinstance(value, (int, float)) and not isinstance(value, bool):
            check_limit(field.name, value)
    if getattr(spec, "time", None) is not None:
        check_time(spec.time)
    if hasattr(spec, "mem_per_node"):
        check_memory(spec.mem_per_node)
