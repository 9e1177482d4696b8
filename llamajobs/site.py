"""The site profile, $LLAMAJOBS_HOME/site.yaml: what differs between clusters, kept out of the code.

It holds site keys (setup lines, env, GPU request syntax, NCCL interface, interpreter) and, at the
top level beside them, defaults for any JobSpec key (partition, account, time, ...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llamajobs.spec import SpecError


@dataclass(frozen=True, kw_only=True, slots=True)
class Site:
    # Shell lines run first on every node: module loads, venv/conda activation.
    setup: tuple[str, ...] = ()
    # Environment variables passed through by name (WANDB_API_KEY, HF_TOKEN): values stay out of scripts.
    env: tuple[str, ...] = ()
    # How GPUs are asked for: a --gres value with {gpus} (gpu:{gpus}, gpu:a100:{gpus}); "" asks for none.
    gres: str = "gpu:{gpus}"
    # NCCL's and gloo's network interface (ib0, eth0); unset lets them choose.
    socket_ifname: str | None = None
    # Interpreter on the nodes; by default the one running llamajobs (a venv on the shared disk).
    python: str | None = None
    # A command the worker runs inside: "apptainer exec --nv /images/torch.sif".
    container: str | None = None
    # Extra srun arguments of the node tasks, e.g. pyxis' --container-image=...
    srun_args: tuple[str, ...] = ()
    # Node-local disk for compiled extensions and Triton caches (shell syntax, expanded on the node).
    cache_dir: str = "${TMPDIR:-/tmp}/llamajobs-$(id -un)"
    runs_dir: str | None = None


SITE_KEYS = {f.name for f in fields(Site)}


def home() -> Path:
    return Path(os.environ.get("LLAMAJOBS_HOME") or Path.home() / ".llamajobs")


def runs_dir(site: Site, flag: str | None = None) -> Path:
    """Where run directories live: --runs-dir, $LLAMAJOBS_RUNS, the profile, or $LLAMAJOBS_HOME/runs."""
    chosen = flag or os.environ.get("LLAMAJOBS_RUNS") or site.runs_dir
    return Path(os.path.expandvars(chosen)).expanduser().absolute() if chosen else home().absolute() / "runs"


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise SpecError(f"{what} {path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} {path}: expected a mapping of keys to values")
    return data


def load(path: Path | None = None) -> tuple[Site, dict[str, Any]]:
    """The profile's site settings and its JobSpec defaults (validated later, with the other sources)."""
    path = path or home() / "site.yaml"
    if not path.exists():
        return Site(), {}
    data = read_yaml(path, "site profile")
    site_values = {k.replace("-", "_"): v for k, v in data.items() if k.replace("-", "_") in SITE_KEYS}
    spec_defaults = {k: v for k, v in data.items() if k.replace("-", "_") not in SITE_KEYS}
    for key in ("setup", "env", "srun_args"):
        value = site_values.get(key) or ()
        site_values[key] = tuple(str(v) for v in ([value] if isinstance(value, str) else value))
    bad = [name for name in site_values["env"] if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name)]
    if bad:
        raise SpecError(f"site profile {path}: env lists names of variables to pass through; {bad[0]!r} is not one")
    return Site(**site_values), spec_defaults
