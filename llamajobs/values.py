"""User-given values parsed and checked the same way everywhere: SLURM times, token counts, --device, and
the one rule for text that may reach a script. Below the spec and the site profile, which both use it."""

from __future__ import annotations

import math
import re
import unicodedata

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
    return int(round(count))


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
