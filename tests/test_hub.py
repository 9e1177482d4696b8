"""A Hub id as --model-path, resolved by the real huggingface_hub code offline (HF_HUB_OFFLINE=1) from a
cache built here in its own layout (hub/models--org--name/{blobs,snapshots/<sha>,refs/main}): pinned
to its commit in spec.json, shown by `status JOB`, rendered into launch.sh as an offline job; and one
job trained from it end to end on the local cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamajobs import hub, spec as spec_mod
from llamajobs.errors import SpecError
from tests.conftest import run_cli, status
from tests.families import hub_cache, make_model_dir

REPO_ID = "tiny-org/tiny-qwen2"
SECRET = "hf_never_written_0451"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(HF_HOME, commit) holding REPO_ID at refs/main, and a second revision (tag v1) of it."""
    root = tmp_path_factory.mktemp("hub")
    model_dir = make_model_dir("qwen2", root / "model")
    home = root / "hf_home"
    commit = hub_cache(model_dir, home, REPO_ID)
    return home, commit


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, cache) -> Path:
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it (its constant is read when it is imported)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(cache[0]))
    return cache[0]


@pytest.mark.parametrize("value, is_id", [("org/name", True), ("Qwen/Qwen2.5-0.5B@main", True),
                                          ("meta-llama/Llama-3.1-8B@0e9e39f", True), ("name", False),
                                          ("/abs/dir", False), ("a/b/c", False), ("org/name@", False)])
def test_what_counts_as_a_hub_id(value, is_id) -> None:
    assert hub.is_hub_id(value) == is_id


def test_an_existing_directory_wins_over_a_hub_id(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub.is_hub_id("org/name")


def test_a_hub_id_resolves_offline_to_its_pinned_snapshot(offline, cache) -> None:
    home, commit = cache
    built = spec_mod.build({"model_path": REPO_ID, "cluster": "local"})
    snapshot = home / "hub" / "models--tiny-org--tiny-qwen2" / "snapshots" / commit
    assert Path(built.model_path) == snapshot
    assert (built.hub_id, built.hub_revision, built.hub_commit, built.hf_home) == (REPO_ID, "main", commit, str(home))
    assert built.model_shape.family == "qwen2" and built.model_shape.qkv_bias
    by_commit = spec_mod.build({"model_path": f"{REPO_ID}@{commit}", "cluster": "local"})
    assert Path(by_commit.model_path) == snapshot and by_commit.hub_revision == commit


def test_site_hf_home_is_the_cache_used(cache, monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    built = spec_mod.build({"model_path": REPO_ID, "cluster": "local"}, site={"hf_home": str(cache[0])})
    assert built.hf_home == str(cache[0]) and built.hub_commit == cache[1]


def test_an_id_missing_from_the_cache_is_one_line(offline) -> None:
    with pytest.raises(SpecError, match=r"^--model-path tiny-org/absent: not in the Hugging Face cache .*hub and "
                                        r"the Hub cannot be reached") as error:
        spec_mod.build({"model_path": "tiny-org/absent", "cluster": "local"})
    assert "\n" not in str(error.value)
    with pytest.raises(SpecError, match="not in the Hugging Face cache"):
        spec_mod.build({"model_path": f"{REPO_ID}@v9", "cluster": "local"})  # no such revision cached


def test_the_recorded_fields_are_not_settings(offline) -> None:
    with pytest.raises(SpecError, match="hub_commit is not a setting"):
        spec_mod.build({"model_path": REPO_ID, "hub_commit": "0" * 40})


def test_submit_of_a_missing_id_exits_2(cli, offline) -> None:
    code, _, err = cli("submit", "--cluster", "local", "--model-path", "tiny-org/absent", "--dry-run")
    assert code == 2 and "not in the Hugging Face cache" in err and len(err.strip().splitlines()) == 1


def test_the_job_runs_offline_from_the_cache_and_writes_no_token(offline, cache, monkeypatch, tmp_path) -> None:
    from llamajobs import render
    from llamajobs.site import Site

    monkeypatch.setenv("HF_TOKEN", SECRET)
    built = spec_mod.build({"model_path": REPO_ID, "cluster": "slurm"})
    written = render.render(built, Site(env=("HF_TOKEN",)), tmp_path / "run")
    launch = (tmp_path / "run" / "launch.sh").read_text()
    assert f"export HF_HUB_OFFLINE=1 HF_HOME={cache[0]}" in launch and "export HF_TOKEN" in launch
    assert not any(SECRET in p.read_text() for p in written)
    stored = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert stored["hub_id"] == REPO_ID and stored["hub_commit"] == cache[1]


def test_data_prepare_takes_a_hub_id_for_its_tokenizer(cli, offline, cache, tmp_path) -> None:
    """The same tokens as from the snapshot directory; a missing id is one line naming --tokenizer."""
    home, commit = cache
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} about the heart and the lungs"}) + "\n"
                              for i in range(20)))
    snapshot = home / "hub" / "models--tiny-org--tiny-qwen2" / "snapshots" / commit
    stores = {}
    for name, tokenizer in (("hub", REPO_ID), ("dir", str(snapshot))):
        code, out, err = cli("data", "prepare", str(corpus), "--tokenizer", tokenizer, "--out", str(tmp_path / name),
                             "--json")
        assert code == 0, err
        stores[name] = json.loads(out)
    assert stores["hub"]["tokens"] == stores["dir"]["tokens"] > 0
    assert stores["hub"]["tokenizer"] == stores["dir"]["tokenizer"]
    code, _, err = cli("data", "prepare", str(corpus), "--tokenizer", "tiny-org/absent", "--out", str(tmp_path / "x"))
    assert code == 2 and err.strip().startswith("Error: --tokenizer tiny-org/absent: not in the Hugging Face cache")


def _train_from_the_hub(cache, tmp_path: Path, *placement: str) -> None:
    """The CLI as a user runs it, HF_HUB_OFFLINE=1 in its environment: submit --wait, status, the export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home, commit = cache
    env = {"LLAMAJOBS_HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HOME": str(home),
           "HF_HUB_OFFLINE": "1", "HF_TOKEN": SECRET}
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "site.yaml").write_text("env: [HF_TOKEN]\n")
    submitted = json.loads(run_cli("submit", *placement, "--model-path", REPO_ID, "--mode", "lora", "--device", "cpu",
                                   "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2", "--max-steps", "3",
                                   "--wait", "--json", env=env, check=True).stdout)
    row = status(env, submitted["id"])
    assert row["state"] == "COMPLETED", row
    assert (row["hub_id"], row["hub_commit"]) == (REPO_ID, commit)
    detail = run_cli("status", str(submitted["id"]), env=env, check=True).stdout
    assert f"{REPO_ID}@main, commit {commit}" in detail
    run_dir = Path(submitted["run_dir"])
    assert "HF_HUB_OFFLINE=1" in (run_dir / "launch.sh").read_text()
    assert not any(SECRET in p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file()
                   and p.stat().st_size < 1_000_000)
    snapshot = home / "hub" / "models--tiny-org--tiny-qwen2" / "snapshots" / commit
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), run_dir / "final")
    assert model.config.model_type == "qwen2"
    assert json.loads((run_dir / "final" / "llamajobs.json").read_text())["base_weights"] == str(snapshot)


@pytest.mark.slow
def test_a_hub_id_trains_on_the_local_cluster_offline(cache, tmp_path) -> None:
    _train_from_the_hub(cache, tmp_path, "--cluster", "local", "--procs-per-node", "2")


@pytest.mark.slurm
def test_a_hub_id_trains_on_two_slurm_nodes_offline(slurm, cache, tmp_path) -> None:
    """The same on the real SLURM cluster, one worker on each of two nodes (written, not run by its author:
    the cluster was another session's that day)."""
    _train_from_the_hub(cache, tmp_path, "--cluster", "slurm", "--nodes", "2", "--procs-per-node", "1",
                        "--time", "00:10:00")
