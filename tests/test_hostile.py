"""Hostile values are refused or stay data: each payload goes into every value that reaches the
rendered scripts, and the scripts are then run (with srun, scontrol and python faked at the
subprocess boundary) to prove that nothing in them executes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from llamajobs import estimate, render, spec
from llamajobs import site as site_mod
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


# --- the site profile: one rule for every value that reaches a script ---

SITE_STRING_KEYS = ["gres", "socket_ifname", "python", "container", "cache_dir", "runs_dir"]


def write_site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key", SITE_STRING_KEYS + ["srun_args", "env"])
@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "\x85"])
def test_control_characters_in_site_values_are_refused_naming_the_key(key, char):
    value = f"x{char}touch PWNED"
    with pytest.raises(SpecError, match=f"site profile: {key} .* contains a control character") as e:
        Site(**{key: (value,) if key in ("srun_args", "env") else value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("gres: 4\n", "site profile .*: gres 4 is not a string"),
    ("cache_dir: [a, b]\n", r"cache_dir \['a', 'b'\] is not a string"),
    ("python: !!binary aGk=\n", "python b'hi' is not a string"),
    ("setup: [1, 2]\n", r"setup \(1, 2\) is not a list of strings"),
    ("srun_args: {a: 1}\n", "srun_args .* is not a list of strings"),
    ("gres: 'gpu:{count}'\n", "gres 'gpu:{count}' is malformed"),
    ("gres: 'gpu:{'\n", "gres 'gpu:{' is malformed"),
    ("container: 'apptainer exec \"unclosed'\n", "container .* cannot be split into words"),
    ("cache_dir: /tmp/$(touch PWNED)\n", "cache_dir .* runs a command"),
    ("env: [HF_TOKEN=x]\n", "'HF_TOKEN=x' is not one"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_wrong_site_values_are_one_line(tmp_path, text, message):
    with pytest.raises(SpecError, match=message) as e:
        site_mod.load(write_site(tmp_path, text))
    assert "\n" not in str(e.value)


def test_a_site_profile_of_bytes_is_one_line(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_bytes(b"gres: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        site_mod.load(path)


def test_sexagesimal_looking_times_stay_strings(tmp_path):
    site, defaults = site_mod.load(write_site(tmp_path, "time: 1:00:00\npartition: gpu\n"))
    assert defaults["time"] == "1:00:00"
    assert spec.build({}, site=defaults).time_minutes == 60  # not 3600 minutes
    config = site_mod.read_yaml(write_site(tmp_path, "time: 90:00\nlr: 1e-4\nnodes: 2\n"), "--config")
    assert config == {"time": "90:00", "lr": "1e-4", "nodes": 2}  # (1e-4 is a YAML 1.1 string; the spec coerces it)


# Every site key, with these payloads, into every rendered script (submitit's included): test_site_shell.py


# --- estimate's assumptions ---


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-0"])
def test_assumptions_refuse_zero_negative_and_nan(value):
    with pytest.raises(ValueError, match=f"--assume network_gbps={value}: must be a finite number above 0") as e:
        estimate.with_overrides({"network_gbps": value})
    assert "\n" not in str(e.value)
    assert estimate.with_overrides({"comm_exposed": "0"}).comm_exposed == 0.0  # (0 means something there)
