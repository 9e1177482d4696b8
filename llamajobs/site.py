"""The site profile, $LLAMAJOBS_HOME/site.yaml: what differs between clusters, kept out of the code.

It holds site keys (setup lines, env, GPU request syntax, NCCL interface, interpreter) and, at the
top level beside them, defaults for any JobSpec key (partition, account, time, ...).

Every value here reaches a shell script: our templates (launch.sh, job.sbatch) and submitit's batch
script alike. The one rule: `setup` is the one key that is shell by design (its lines run as written,
first, on every node); every other value passes `check_text` (no control characters), is refused at
load when it cannot be data (a gres other than {gpus} substitution, an env entry that is no variable
name, a cache_dir that runs a command), and is quoted wherever it is rendered, so it stays data.
tests/test_site_shell.py walks every key into every rendered script.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from llamajobs import catalog
from llamajobs.errors import SpecError
from llamajobs.values import check_text


@dataclass(frozen=True, kw_only=True, slots=True)
class Site:
    # Shell lines run first on every node, as written: module loads, venv/conda activation. The one
    # raw-shell key of the profile.
    setup: tuple[str, ...] = ()
    # Environment variables passed through by name (WANDB_API_KEY, HF_TOKEN): values stay out of scripts.
    env: tuple[str, ...] = ()
    # How GPUs are asked for: a --gres value where {gpus} (the only placeholder) becomes the count per
    # node: gpu:{gpus}, gpu:a100:{gpus}; "" asks for none.
    gres: str = "gpu:{gpus}"
    # NCCL's and gloo's network interface (ib0, eth0); unset lets them choose.
    socket_ifname: str | None = None
    # Interpreter on the nodes; by default the one running llamajobs (a venv on the shared disk).
    python: str | None = None
    # A command the worker runs inside: "apptainer exec --nv /images/torch.sif" (split into words as the
    # shell would, each word quoted).
    container: str | None = None
    # Extra srun arguments of the node tasks, e.g. pyxis' --container-image=...
    srun_args: tuple[str, ...] = ()
    # Node-local disk for compiled extensions and Triton caches. Expanded on the node inside double
    # quotes: $VARIABLES and ${VAR:-default} work; command substitution belongs in `setup`.
    cache_dir: str = "${TMPDIR:-/tmp}/llamajobs-$UID"
    runs_dir: str | None = None
    # The GPU type of the site's nodes (a catalog name: a100-80g, h100, ...): what `estimate` and submit's
    # fit check assume when --gpu is not given.
    gpu: str | None = None
    # Nodes every job keeps out of (a node that keeps failing), added to a job's --exclude.
    keep_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate(self)

    def gres_for(self, gpus: int) -> str | None:
        """The --gres value for `gpus` GPUs per node (None when the site asks for none). Plain text
        substitution: gres is not a format string."""
        return self.gres.replace(GPUS_PLACEHOLDER, str(gpus)) if self.gres else None

    def excluded(self, exclude: str | None) -> str | None:
        """SLURM's --exclude: the job's, then the site's keep_out nodes."""
        nodes = [n for n in (exclude or "").split(",") if n]
        return ",".join(nodes + [n for n in self.keep_out if n not in nodes]) or None


SITE_KEYS = {f.name: f for f in fields(Site)}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
GPUS_PLACEHOLDER = "{gpus}"
# What a --gres value is made of (gpu:a100:8, gpu:2,shard:4, gpu:nvidia_h100_80gb_hbm3:8), once
# {gpus} is taken out.
_GRES = re.compile(r"^[A-Za-z0-9_.:,/-]{0,200}$")


def validate(site: Site) -> None:
    """Types, then the one rule for text that reaches a script; SpecError naming the key."""
    for name, field in SITE_KEYS.items():
        value = getattr(site, name)
        many = str(field.type).startswith("tuple")
        if value is None and "None" in str(field.type):
            continue
        items = value if many and isinstance(value, tuple) else (value,)
        if (many and not isinstance(value, tuple)) or not all(isinstance(v, str) for v in items):
            what = "a list of strings" if many else "a string"
            raise SpecError(f"site profile: {name} {value!r} is not {what}")
        for item in items:
            # setup is shell by design, one line per item (indented with tabs if you like); every
            # other value is data
            check_text(f"site profile: {name}", item, allowed="\t" if name == "setup" else "")
    bad = [v for v in site.env if not _ENV_NAME.match(v)]
    if bad:
        raise SpecError(f"site profile: env lists names of variables to pass through; {bad[0]!r} is not one")
    if not _GRES.match(site.gres.replace(GPUS_PLACEHOLDER, "")):
        raise SpecError(f"site profile: gres {site.gres[:80]!r}{'...' if len(site.gres) > 80 else ''} is malformed; "
                        f"give e.g. gpu:{{gpus}} or gpu:a100:{{gpus}}: up to 200 letters, digits and . _ : , / -, "
                        f"with {{gpus}} the only placeholder")
    if site.gpu is not None and site.gpu not in catalog.GPUS:
        raise SpecError(f"site profile: gpu {site.gpu!r} is not known; choose one of {', '.join(catalog.GPUS)}")
    if site.container is not None:
        try:
            shlex.split(site.container)
        except ValueError as e:
            raise SpecError(f"site profile: container {site.container!r} cannot be split into words ({e})") from None
    if "$(" in site.cache_dir or "`" in site.cache_dir:
        raise SpecError(f"site profile: cache_dir {site.cache_dir!r} runs a command; only $VARIABLES expand there "
                        "(put commands in setup)")


def home() -> Path:
    return Path(os.environ.get("LLAMAJOBS_HOME") or Path.home() / ".llamajobs")


def runs_dir(site: Site, flag: str | None = None) -> Path:
    """Where run directories live: --runs-dir, $LLAMAJOBS_RUNS, the profile, or $LLAMAJOBS_HOME/runs."""
    chosen = flag or os.environ.get("LLAMAJOBS_RUNS") or site.runs_dir
    return Path(os.path.expandvars(chosen)).expanduser().absolute() if chosen else home().absolute() / "runs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that sexagesimal-looking values (1:00:00, 90:00) stay strings:
    YAML 1.1 reads an unquoted `time: 1:00:00` as the integer 3600, which SLURM would take as minutes."""


_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_Loader.yaml_implicit_resolvers = {first: list(resolvers)
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "+-0123456789":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(0, ("tag:yaml.org,2002:str", _SEXAGESIMAL))


def read_yaml(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping (site.yaml, a run YAML); SpecError in one line for anything else."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except OSError as e:
        raise SpecError(f"{what} {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SpecError(f"{what} {path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise SpecError(f"{what} {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} {path}: expected a mapping of keys to values")
    return {str(key): value for key, value in data.items()}


def from_mapping(data: dict[str, Any], where: str = "site profile") -> tuple[Site, dict[str, Any]]:
    """The profile's site settings and its JobSpec defaults (validated later, with the other sources)."""
    site_values = {k.replace("-", "_"): v for k, v in data.items() if k.replace("-", "_") in SITE_KEYS}
    spec_defaults = {k: v for k, v in data.items() if k.replace("-", "_") not in SITE_KEYS}
    for key in ("setup", "env", "srun_args", "keep_out"):
        value = site_values.get(key) or ()
        site_values[key] = tuple(value) if isinstance(value, list) else (value,) if isinstance(value, str) else value
    try:
        return Site(**site_values), spec_defaults
    except SpecError as e:
        raise SpecError(str(e).replace("site profile", where, 1)) from None


def load(path: Path | None = None) -> tuple[Site, dict[str, Any]]:
    """$LLAMAJOBS_HOME/site.yaml (or `path`): the site settings and the JobSpec defaults it holds."""
    path = path or home() / "site.yaml"
    if not path.exists():
        return Site(), {}
    return from_mapping(read_yaml(path, "site profile"), f"site profile {path}")
