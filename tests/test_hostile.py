"""Hostile values are refused or stay data: each payload goes into every value that reaches the
rendered scripts, and the scripts are then run (with srun, scontrol and python faked at the
subprocess boundary) to prove that nothing in them executes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llamajobs import render, spec
from llamajobs.errors import SpecError
from llamajobs.site import Site

PAYLOADS = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "x; touch PWNED", "x && touch PWNED",
            "x\ntouch PWNED", "x\rtouch PWNED", "$HOME", "x' ; touch PWNED ; '"]
STRING_FIELDS = ["partition", "account", "qos", "constraint", "exclude", "mail_user", "mail_type", "wandb", "name",
                 "time"]


def fake_bin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in {"srun": 'shift 2; exec "$@"', "scontrol": "echo n1", "nvidia-smi": "exit 1",
                       "python": 'printf "%s\\n" "$@" > "$ARGS_OUT"'}.items():
        (folder / name).write_text(f"#!/bin/bash\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def run_scripts(run_dir: Path, cwd: Path) -> None:
    bin_dir = fake_bin(cwd / "bin")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "7", "ARGS_OUT": str(cwd / "args"), "TMPDIR": str(cwd)}
    for script in ("job.sbatch", "launch.sh"):
        subprocess.run(["bash", str(run_dir / script)], env=env, cwd=cwd, capture_output=True, timeout=30)


@pytest.mark.parametrize("field", STRING_FIELDS)
def test_hostile_spec_values_are_refused_or_inert(field, tmp_path):
    for i, payload in enumerate(PAYLOADS):
        try:
            s = spec.build({"cluster": "slurm", "procs_per_node": 1, "global_batch": 4, field: payload})
        except SpecError as e:
            assert f"--{field.replace('_', '-')}" in str(e)
            continue
        run_dir = tmp_path / str(i)
        render.render(s, Site(python=str(tmp_path / "bin" / "python")), run_dir)
        run_scripts(run_dir, tmp_path)
        assert not (tmp_path / "PWNED").exists(), f"--{field} {payload!r} executed"
        assert "\n" not in payload and "\r" not in payload, f"--{field} accepted a line break"


@pytest.mark.parametrize("payload", [p for p in PAYLOADS if "\n" not in p and "\r" not in p])
def test_hostile_run_dir_and_interpreter_paths_stay_data(payload, tmp_path):
    run_dir = tmp_path / f"runs {payload}" / "1-job"
    python = tmp_path / f"bin {payload}" / "python"
    fake_bin(python.parent)
    render.render(spec.build({"cluster": "slurm", "procs_per_node": 1, "global_batch": 4}), Site(python=str(python)),
                  run_dir)
    run_scripts(run_dir, tmp_path)
    assert not (tmp_path / "PWNED").exists()
    args = (tmp_path / "args").read_text().splitlines()
    assert args[-1] == str(run_dir)  # the worker got the run dir intact, through both scripts


def test_line_breaks_in_paths_are_refused(tmp_path):
    with pytest.raises(SpecError, match="control character"):
        render.render(spec.build({}), Site(), tmp_path / "a\ntouch PWNED")


def test_secrets_are_passed_by_name_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    s = spec.build({"cluster": "slurm"})
    render.render(s, Site(env=("HF_TOKEN", "WANDB_API_KEY")), tmp_path)
    for path in tmp_path.iterdir():
        assert "hf_secret" not in path.read_text()
    assert "export HF_TOKEN WANDB_API_KEY\n" in (tmp_path / "launch.sh").read_text()
