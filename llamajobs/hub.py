"""A Hugging Face Hub id as --model-path (org/name[@revision]), as from_pretrained takes one.

Resolved once, on the submitting host, by huggingface_hub's snapshot_download into the cache under
HF_HOME (site.yaml's hf_home, else $HF_HOME, else huggingface_hub's default), and pinned: the spec
records the id, the revision asked for and the commit it resolved to, and its model_path becomes that
commit's snapshot directory. The job then runs with HF_HUB_OFFLINE=1 (launch.sh), so no rank of a
large job ever asks the Hub anything; it reads the snapshot like any model directory.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from llamajobs.errors import SpecError
from llamajobs.values import check_text

# org/name as the Hub spells them (letters, digits, '-', '_', '.'), then an optional @branch, tag or commit.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
                    r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{0,127}))?$")
# What a job needs from a model repository: weights, config, tokenizer. Not Meta's original/ copy of
# the weights (Llama 3.x repositories hold the model twice) nor other frameworks' formats.
RECORDED = ("hub_id", "hub_revision", "hub_commit")  # JobSpec fields: recorded by `recorded`, never set
IGNORE = ["original/*", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.ot", "*.tflite"]


@dataclass(frozen=True, slots=True)
class HubModel:
    repo_id: str
    revision: str  # as asked: a branch, a tag or a commit
    commit: str  # the commit it resolved to
    path: Path  # that commit's snapshot directory in the cache
    hf_home: Path


def is_hub_id(value: str) -> bool:
    """True for org/name[@revision] that is not a path here (a directory wins, as in from_pretrained)."""
    return HUB_ID.match(value) is not None and not os.path.lexists(value)


def hf_home(configured: str | None = None) -> Path:
    """The Hugging Face home the job shares with the submitting host."""
    if configured:
        return Path(configured).expanduser().absolute()
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HOME") or constants.HF_HOME).expanduser().absolute()


def resolve(model: str, configured_home: str | None = None, flag: str = "--model-path") -> HubModel:
    """Download (or find, offline) the snapshot of a Hub id; SpecError, one line naming `flag`, when it cannot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    match = HUB_ID.match(model)
    if match is None:
        raise SpecError(f"{flag} {model!r} is neither a directory here nor a Hub id (org/name[@revision])")
    repo_id, revision = match["repo"], match["revision"] or "main"
    home = hf_home(configured_home)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=home / "hub", ignore_patterns=IGNORE))
    except LocalEntryNotFoundError:
        raise SpecError(f"{flag} {model}: not in the Hugging Face cache {home / 'hub'} and the Hub cannot be "
                        f"reached (HF_HUB_OFFLINE or no network); download it there first, or pass a directory") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # no such repository or revision, gated, no access
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"{flag} {model}: the Hub refused it ({type(e).__name__}: {first})") from None
    if path.parent.name != "snapshots":
        raise SpecError(f"{flag} {model}: resolved to {path}, not a snapshot of the cache under {home}")
    return HubModel(repo_id=repo_id, revision=revision, commit=path.name, path=path, hf_home=home)


def recorded(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What spec.build records when the settings' model_path is a Hub id: the snapshot as model_path, the
    id, revision, commit and cache; {} for a directory. SpecError for a recorded field given as a setting."""
    for name in RECORDED:
        if name in settings:
            raise SpecError(f"{name} is not a setting: it is recorded when --model-path names a Hub id")
    model, home = settings.get("model_path"), settings.get("hf_home")
    if isinstance(home, str):
        check_text("hf_home", home)
    if not (isinstance(model, str) and is_hub_id(model)):
        return {}
    found = resolve(model, home if isinstance(home, str) else None)
    return {"model_path": str(found.path), "hub_id": found.repo_id, "hub_revision": found.revision,
            "hub_commit": found.commit, "hf_home": str(found.hf_home)}
