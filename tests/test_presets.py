"""The presets shipped in llamajobs/presets/: every one builds its JobSpec, renders, and fits on the GPU
the estimate assumes by default; `submit --config NAME|FILE`; `llamajobs presets`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from llamajobs import catalog, estimate, fit, presets, render, spec as spec_mod
from tests import golden
from tests.families import hub_cache

DEFAULT_GPU = catalog.GPUS[estimate.DEFAULT_GPU]
HUB_PRESETS = [name for name in presets.names() if presets.hub_model(presets.settings(name))]


def test_the_issue_s_runs_are_shipped():
    assert {"7b-full-fsdp", "7b-lora-fsdp", "7b-full-ds-zero3-offload", "13b-full-ds-zero3-offload",
            "llama3.1-8b-chat-lora", "qwen2.5-7b-full-fsdp", "mistral-7b-lora-fsdp",
            "llama3.1-70b-lora-2nodes"} <= set(presets.names())
    assert set(HUB_PRESETS) == {"llama3.1-8b-chat-lora", "qwen2.5-7b-full-fsdp", "mistral-7b-lora-fsdp",
                                "llama3.1-70b-lora-2nodes"}


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_builds_renders_and_fits(name, tmp_path):
    assert presets.path(name).read_text().startswith("# ") and presets.description(name)
    built = golden.preset_spec(name)
    written = {path.name: path for path in render.render(built, golden.SITE, tmp_path)}
    assert spec_mod.JobSpec.load(written["spec.json"]) == built
    assert ("ds_config.json" in written) == built.strategy_info.deepspeed
    for script in ("launch.sh", "job.sbatch"):
        subprocess.run(["bash", "-n", str(written[script])], check=True)
    # As `estimate hours` and submit's fit check plan it: it must fit where users will run it.
    planned = fit.plan_for_gpu(built, DEFAULT_GPU)
    result = estimate.hours(planned, DEFAULT_GPU, built.tokens_per_epoch or 2_500_000_000)
    assert result.hours_per_epoch > 0 and result.verdict == "fits", result.gpu_mem_gib
    assert estimate.fit_check(planned, DEFAULT_GPU) is None


@pytest.mark.parametrize("name", HUB_PRESETS)
def test_a_hub_preset_submits_at_the_shape_it_is_planned_with(name, tmp_path, monkeypatch):
    """The Hub id resolved offline from a cache holding a config.json of the catalog's shape for the
    preset's size: the spec a submit builds records the id, trains that shape and runs offline."""
    from huggingface_hub import constants

    values = presets.settings(name)
    shape = catalog.SIZES[values["size"]]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(shape.hf_config()))
    commit = hub_cache(model_dir, tmp_path / "hf", values["model_path"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    built = spec_mod.build({"cluster": "slurm"}, values, {"hf_home": str(tmp_path / "hf")})
    assert (built.hub_id, built.hub_commit) == (values["model_path"], commit)
    assert built.model_shape == dataclasses.replace(shape, name=commit)
    render.render(built, golden.SITE, tmp_path / "run")
    assert "export HF_HUB_OFFLINE=1" in (tmp_path / "run" / "launch.sh").read_text()


def test_every_golden_folder_is_a_preset():
    assert sorted(p.name for p in golden.ROOT.iterdir() if p.is_dir()) == presets.names()


def test_config_takes_a_preset_name_and_flags_win(cli, tmp_path):
    code, _, stderr = cli("render", "--config", "7b-lora-fsdp", "--out", str(tmp_path / "named"))
    assert code == 0, stderr
    named = json.loads((tmp_path / "named" / "spec.json").read_text())
    assert (named["size"], named["mode"], named["lr"], named["time"]) == ("7b", "lora", 2e-4, "24:00:00")
    code, _, stderr = cli("render", "--config", "7b-lora-fsdp", "--lr", "1e-4", "--nodes", "2",
                          "--out", str(tmp_path / "flags"))
    assert code == 0, stderr
    flags = json.loads((tmp_path / "flags" / "spec.json").read_text())
    assert (flags["mode"], flags["lr"], flags["nodes"]) == ("lora", 1e-4, 2)


def test_submit_takes_a_preset_s_name(cli, tmp_path):
    code, _, stderr = cli("submit", "--config", "7b-lora-fsdp", "--size", "tiny", "--cluster", "local", "--dry-run")
    assert code == 0, stderr
    folder = Path(stderr.split("rendered into ")[1].split(";")[0])
    dry = json.loads((folder / "spec.json").read_text())
    shutil.rmtree(folder)  # a dry run's folder is the user's to keep
    assert (dry["size"], dry["mode"], dry["lr"], dry["cluster"]) == ("tiny", "lora", 2e-4, "local")


def test_a_file_of_the_preset_s_name_wins(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("7b-lora-fsdp").write_text("size: 13b\n")
    code, _, stderr = cli("render", "--config", "7b-lora-fsdp", "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    written = json.loads((tmp_path / "out" / "spec.json").read_text())
    assert (written["size"], written["mode"]) == ("13b", "full")


def test_an_unknown_config_is_one_line_naming_the_presets(cli):
    code, stdout, stderr = cli("submit", "--config", "7b-lora", "--cluster", "local")
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == [
        f"Error: --config '7b-lora' is neither a file nor a preset; presets: {', '.join(presets.names())}"]


def test_presets_lists_each_with_its_estimate(cli):
    code, stdout, stderr = cli("presets", "--json")
    assert code == 0, stderr
    listed = json.loads(stdout)
    assert listed["gpu"] == estimate.DEFAULT_GPU
    rows = {row["name"]: row for row in listed["presets"]}
    assert list(rows) == presets.names()
    for name, row in rows.items():
        assert row["description"] == presets.description(name) and row["verdict"] == "fits"
        assert row["hours_per_epoch"] > 0
    assert rows["7b-full-fsdp"]["tokens_per_epoch"] == 2_500_000_000  # its own
    assert (rows["llama3.1-70b-lora-2nodes"]["model"], rows["llama3.1-70b-lora-2nodes"]["nodes"]) == (
        "meta-llama/Llama-3.1-70B-Instruct", 2)
    assert rows["13b-full-ds-zero3-offload"]["model"] is None
    code, stdout, _ = cli("presets", "--json", "--gpu", "h100", "--tokens", "5B")
    faster = {row["name"]: row for row in json.loads(stdout)["presets"]}
    assert all(row["tokens_per_epoch"] == 5_000_000_000 for row in faster.values())
    # Per token an H100 is never slower, and faster where compute bounds the step (not 7b-full-fsdp's
    # two nodes, which wait on the network alike).
    per_token = {name: (row["hours_per_epoch"] / 5e9, rows[name]["hours_per_epoch"] / rows[name]["tokens_per_epoch"])
                 for name, row in faster.items()}
    assert all(h100 <= a100 * (1 + 1e-9) for h100, a100 in per_token.values())
    assert per_token["7b-lora-fsdp"][0] < 0.8 * per_token["7b-lora-fsdp"][1]
    code, stdout, _ = cli("presets")
    assert code == 0 and all(name in stdout for name in presets.names())
