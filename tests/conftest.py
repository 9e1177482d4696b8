"""Fixtures shared by the suite: an isolated LLAMAJOBS_HOME and cache, a CLI runner, torchrun
launches of this checkout, a one-process gloo group, the bundled tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT_S = 180


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $LLAMAJOBS_HOME and registry cache, so no test sees another's runs or profile."""
    monkeypatch.setenv("LLAMAJOBS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LLAMAJOBS_RUNS", raising=False)
    return tmp_path / "home"


@pytest.fixture
def cli(home: Path):
    """Invoke the CLI in-process through main()'s error handling: returns (exit code, stdout, stderr)."""
    from llamajobs.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        runner = CliRunner()
        old = sys.argv
        sys.argv = ["llamajobs", *args]
        code = 0
        try:
            with runner.isolation() as streams:
                try:
                    main()
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                stdout, stderr = streams[0].getvalue().decode(), streams[1].getvalue().decode()
        finally:
            sys.argv = old
        return code, stdout, stderr
    return run


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """The installed console script in a subprocess, as a user runs it."""
    exe = Path(sys.executable).parent / "llamajobs"
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"llamajobs {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def slurm():
    """The real SLURM cluster (tests/slurm/cluster.sh), started once per session; skipped without root/apt."""
    from tests.slurm.fixture import slurm_cluster

    yield from slurm_cluster()


def status(env: dict[str, str], job_id: int) -> dict:
    """`llamajobs status JOB --json`, parsed."""
    return json.loads(run_cli("status", str(job_id), "--json", env=env, check=True).stdout)


def metrics_rows(run_dir: Path) -> list[dict]:
    """RUN_DIR/metrics.jsonl, every row."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a: dict, b: dict) -> None:
    """The same names, each tensor bitwise equal."""
    import torch

    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def debug_section(fault: str | None = None, **switches: object) -> dict:
    """spec.json's debug section (spec.DebugSpec) for `fault` as the tests spell it, KIND:STEP ("crash:3")."""
    kind, _, step = (fault or "").partition(":")
    return {"fault": kind or None, "fault_step": int(step or 0), **switches}


def set_fault(run_dir: Path, fault: str | None) -> None:
    """RUN_DIR/spec.json with `fault` injected by the next launch (None: no fault), its other debug
    switches kept: what the environment variable LLAMAJOBS_INJECT_FAULT once did for one launch."""
    from llamajobs.spec import DebugSpec, JobSpec

    path = run_dir / "spec.json"
    spec = JobSpec.load(path)
    switches = {k: v for k, v in dataclasses.asdict(spec.debug).items() if k not in ("fault", "fault_step")}
    debug = DebugSpec(**debug_section(fault, **switches))
    path.write_text(dataclasses.replace(spec, debug=debug).to_json())


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None,
             timeout: float = TORCHRUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` with this checkout importable (faults are the
    run dir's spec.json's: set_fault)."""
    environment = dict(os.environ)
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    environment.update(PYTHONPATH=python_path, **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def assert_exit_0(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture
def single_rank_group(tmp_path: Path):
    """A one-process gloo group, for the worker's collectives in-process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tokenizer (TINY_VOCAB, trained on the sample corpus), trained once per session."""
    from llamajobs.catalog import TINY_VOCAB
    from llamajobs.data import read_texts
    from llamajobs.data.tokenizer import train_tokenizer

    return train_tokenizer(read_texts(), TINY_VOCAB, tmp_path_factory.mktemp("tokenizer"))
