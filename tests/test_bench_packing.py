"""bench/packing.py: the worker's step on the same documents unpacked, packed across documents, and
packed with documents isolated. The CPU smoke checks that it runs and counts the same work for both
packings; the GPU case measures the cost and that the isolated step makes no host sync."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

BENCH = REPO / "bench" / "packing.py"


def _bench(tmp_path: Path, *args: str, timeout: int) -> list[dict]:
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCH), *args, "--json", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    return json.loads(out.read_text())


def _check(rows: list[dict]) -> dict[tuple[str, str], dict]:
    by = {(r["case"], r["way"]): r for r in rows}
    for (case, way), row in by.items():
        assert not row["error"] and row["target_tokens_per_s"] > 0, row
        if way == "isolated":  # the same rows as packed: the same work, only the attention differs
            packed = by[(case, "packed")]
            assert (row["documents"], row["target_tokens"]) == (packed["documents"], packed["target_tokens"])
            assert row["documents"] > by[(case, "unpacked")]["documents"]
    return by


@pytest.mark.slow
def test_cpu_packing_bench_runs(tmp_path: Path) -> None:
    rows = _bench(tmp_path, "--cpu", "--warmup", "1", "--steps", "1", "--repeats", "1", timeout=300)
    assert {r["way"] for r in rows} == {"unpacked", "packed", "isolated"}
    _check(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_packing_bench_isolation_cost_and_no_host_sync(tmp_path: Path) -> None:
    rows = _bench(tmp_path, timeout=900)
    by = _check(rows)
    assert all(r["host_sync"] == "none" for r in rows), rows  # the mask is built on the device
    for case in {r["case"] for r in rows}:
        assert by[(case, "isolated")]["vs_packed"] > 0.5  # the masked kernel costs, but not half the step
