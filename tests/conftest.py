"""Fixtures shared by the suite: an isolated LLAMAJOBS_HOME and cache, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent


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
