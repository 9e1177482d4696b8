"""The one rule for what reaches a shell from the site profile: every key but `setup` is data, quoted
wherever it is rendered or refused at load naming the key; `setup` is shell by design. Each key, with
hostile values, goes through site.yaml into every script a job runs: our launch.sh and job.sbatch, and
the batch scripts submitit writes for a submit and for a sharded prepare (rendered by submitit's
SlurmExecutor without sbatch). The scripts are then run with srun, scontrol and the interpreter faked,
to prove that nothing in them executes and that the interpreter gets its arguments intact."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from llamajobs import cluster, render, spec, submit
from llamajobs import site as site_mod
from llamajobs.data import sharded_prepare
from llamajobs.errors import SpecError

PAYLOADS = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "x; touch PWNED", "x && touch PWNED",
            "x' ; touch PWNED ; '", "x\ntouch PWNED"]

# What each site key is given for a payload (a value as a user would write it in site.yaml). A key
# missing here fails test_every_site_key_is_walked: a new key must say how it reaches a shell.
VALUES = {
    "setup": None,  # shell by design: test_setup_lines_run_as_written
    "env": lambda p, tmp: [f"HF_TOKEN{p}"],
    "gres": lambda p, tmp: f"gpu:{p}:{{gpus}}",
    "socket_ifname": lambda p, tmp: p,
    "python": lambda p, tmp: str(tmp / f"bin {p}" / "python"),
    "container": lambda p, tmp: f"env X={shlex.quote(p)}",
    "srun_args": lambda p, tmp: [f"--x={p}"],
    # (cache_dir's $VARIABLES expand on the node by design)
    "cache_dir": lambda p, tmp: f"{tmp}/cache {p}",
    "runs_dir": lambda p, tmp: f"{tmp}/runs {p}",
    "keep_out": lambda p, tmp: [f"n{p}"],
    "gpu": lambda p, tmp: f"a100{p}",
}

# srun skips its own options (and the site's srun_args) and runs the command; the interpreter records
# its arguments, one per line, into $ARGS_OUT.
FAKES = {
    "srun": 'while [[ $# -gt 0 && $1 == -* ]]; do case $1 in --output|--error) shift 2;; *) shift;; esac; done\n'
            'exec "$@"',
    "scontrol": "echo n1",
    "nvidia-smi": "exit 1",
    "python": 'printf "%s\\n" "$@" > "$ARGS_OUT"',
}


def fake_bin(folder: Path, names=FAKES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"#!/bin/bash\n{FAKES[name]}\n")
        (folder / name).chmod(0o755)


def scripts(site: site_mod.Site, run_dir: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Every script a job of this site runs, written out: {name: (path, the argument the interpreter
    must receive last but for submitit's own)}."""
    s = spec.build({"cluster": "slurm", "procs_per_node": 1, "global_batch": 4, "time": "1:00:00"})
    render.render(s, site, run_dir)
    found = {"launch.sh": (run_dir / "launch.sh", str(run_dir)), "job.sbatch": (run_dir / "job.sbatch", str(run_dir))}
    prepare = sharded_prepare.allocation(sharded_prepare.ClusterConfig(shards=2, cluster="slurm", time="1:00:00"),
                                         1, "corpus")
    for name, allocation in (("submitit submit", submit.allocation(s, site)), ("submitit prepare", prepare)):
        executor = cluster.backend("slurm").executor(allocation, folder / name)
        path = folder / f"{name}.sh"
        path.write_text(executor._make_submission_file_text(executor._submitit_command_str, "uid"))
        found[name] = (path, str(folder / name))
    return found


def run(path: Path, cwd: Path, args_out: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{cwd / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "7", "ARGS_OUT": str(args_out), "TMPDIR": str(cwd)}
    return subprocess.run(["bash", str(path)], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """$LLAMAJOBS_HOME with the fakes on PATH (submitit's SlurmExecutor wants an srun there)."""
    fake_bin(tmp_path / "bin")
    monkeypatch.setenv("LLAMAJOBS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def load_site(home: Path, values: dict) -> site_mod.Site:
    (home / "site.yaml").write_text(yaml.safe_dump(values))
    return site_mod.load()[0]


def test_every_site_key_is_walked():
    assert set(VALUES) == set(site_mod.SITE_KEYS)


@pytest.mark.parametrize("key", [k for k, v in VALUES.items() if v is not None])
def test_each_site_key_is_quoted_in_every_script_or_refused_at_load(key, home, tmp_path):
    for i, payload in enumerate(PAYLOADS):
        case = tmp_path / f"case{i}"
        case.mkdir()
        values = {"python": str(tmp_path / "bin" / "python"), key: VALUES[key](payload, case)}
        if key == "python":
            fake_bin(Path(values["python"]).parent, ["python"])
        try:
            site = load_site(home, values)
        except SpecError as e:
            assert f" {key} " in str(e) and "\n" not in str(e), e
            continue
        assert "\n" not in payload, f"{key} accepted a line break"
        runs = Path(site.runs_dir) if site.runs_dir else case / "runs"
        for name, (path, last) in scripts(site, runs / "1-job", case).items():
            args_out = case / f"args {name}"
            done = run(path, case, args_out)
            assert not (case / "PWNED").exists(), f"{key} {payload!r} executed in {name}"
            assert args_out.exists(), f"{key} {payload!r}: {name} never reached the interpreter: {done.stderr}"
            args = args_out.read_text().splitlines()
            assert last in args[-2:], (name, args)  # (job.sbatch's launcher gets a wait in seconds after it)


def test_setup_lines_run_as_written(home, tmp_path):
    """setup is shell by design (module loads, venv activation): its lines land verbatim in every script."""
    lines = ["module load cuda/12.1", 'export MARK="$(echo set up)"']
    site = load_site(home, {"setup": lines, "python": str(tmp_path / "bin" / "python")})
    for name, (path, _) in scripts(site, tmp_path / "runs" / "1-job", tmp_path).items():
        assert all(line in path.read_text().splitlines() for line in lines), name


def test_submitit_gets_the_interpreter_as_one_quoted_word(home, tmp_path):
    site = load_site(home, {"python": "/shared/my envs/bin/python"})
    executor = cluster.backend("slurm").executor(submit.allocation(
        spec.build({"cluster": "slurm", "time": "1:00:00"}), site), tmp_path / "submitit")
    assert shlex.split(executor._submitit_command_str)[0] == "/shared/my envs/bin/python"


# --- gres: {gpus} is substituted, nothing else ---


@pytest.mark.parametrize("gres", ["{gpus.__class__}", "gpu:{gpus.__class__.__mro__}", "gpu:{gpus:>52428800}",
                                  "gpu:{0}", "gpu:{}", "gpu:{count}", "gpu:{", "gpu:}", "gpu:{{gpus}}",
                                  "gpu:" + "a" * 300, "gpu:a b:{gpus}", "gpu:{gpus};reboot"])
def test_gres_other_than_a_gpus_substitution_is_refused_naming_the_key(gres):
    with pytest.raises(SpecError, match="site profile: gres .* is malformed; give e.g. gpu:{gpus}") as e:
        site_mod.from_mapping({"gres": gres})
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_gres_substitutes_the_gpus_per_node(tmp_path):
    site, _ = site_mod.from_mapping({"gres": "gpu:nvidia_h100_80gb_hbm3:{gpus},shard:2"})
    s = spec.build({"cluster": "slurm", "gpus_per_node": 4})
    assert render.gres(s, site) == submit.allocation(s, site).gres == "gpu:nvidia_h100_80gb_hbm3:4,shard:2"
    render.render(s, site, tmp_path)
    assert "#SBATCH --gres=gpu:nvidia_h100_80gb_hbm3:4,shard:2\n" in (tmp_path / "job.sbatch").read_text()
    assert site_mod.from_mapping({"gres": ""})[0].gres_for(8) is None  # "" asks for no GPUs
