"""The presets shipped with the package: run YAMLs (llamajobs/presets/NAME.yaml) with the keys
`submit --config FILE` takes, each opening with a comment line that says what it is.

`submit --config NAME` and `render --config NAME` take a preset's name where no file of that name
exists; `llamajobs presets` lists them with their estimate (listing.py). A preset naming a Hub model gives its
`model_path` as a Hub id and its `size` as the catalog's entry for that model's shape: a submit
resolves the id and reads the shape from its config.json (as for --model-path); a plan made without
the network (the listing, the golden scripts, the tests) leaves the id out and uses that size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamajobs import hub, site
from llamajobs.errors import SpecError

DIR = Path(__file__).parent


def names() -> list[str]:
    return sorted(path.stem for path in DIR.glob("*.yaml"))


def path(name: str) -> Path:
    if name not in names():
        raise SpecError(f"no preset {name!r}; presets: {', '.join(names())}")
    return DIR / f"{name}.yaml"


def config_file(value: str) -> Path:
    """--config NAME|FILE: a file wins when it exists (a preset's name is also a valid relative path);
    else the preset of that name; SpecError listing the presets for neither."""
    if Path(value).is_file():
        return Path(value)
    if value in names():
        return path(value)
    raise SpecError(f"--config {value!r} is neither a file nor a preset; presets: {', '.join(names())}")


def settings(name: str) -> dict[str, Any]:
    """The preset's keys, as `--config` reads them."""
    return site.read_yaml(path(name), f"preset {name}")


def description(name: str) -> str:
    """The preset's first line, its comment saying what it is."""
    first = path(name).read_text(encoding="utf-8").splitlines()[0]
    return first.removeprefix("#").strip()


def hub_model(values: dict[str, Any]) -> str | None:
    """The Hub id the settings' model_path names, or None (a directory, or no model_path)."""
    model = values.get("model_path", values.get("model-path"))
    return model if isinstance(model, str) and hub.is_hub_id(model) else None


def offline(values: dict[str, Any]) -> dict[str, Any]:
    """The settings planned without the network: a Hub id as model_path is left out, so the shape is
    the catalog's for the preset's size (resolving the id downloads the model)."""
    if hub_model(values) is None:
        return dict(values)
    return {k: v for k, v in values.items() if k not in ("model_path", "model-path")}
