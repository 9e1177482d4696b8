"""Chat `data prepare` cost: throughput by --workers against --workers 1 in the same run, and the peak
memory of one long message against its size.

The corpus is generated: conversations of 2 to 8 turns whose messages are runs of sentences of the
bundled PMC sample (a few hundred characters to a few kB, like ShareGPT's), about --mb megabytes of
JSONL; the long message is one assistant answer of --long-mb megabytes. The tokenizer is a byte-level
BPE tokenizer.json with a ChatML template trained here (tests/families.py, Qwen2's kind: no BOS), or
--tokenizer DIR.

    python bench/chat.py [--mb 4] [--workers 1,2] [--long-mb 10] [--tokenizer DIR] [--json]

Each prepare runs in its own process (`llamajobs data prepare`), so its start-up (imports, loading the
tokenizer) is counted as a user pays it, and its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from llamajobs.data import SAMPLE_CORPUS, read_texts  # noqa: E402


def sentences() -> list[str]:
    return [s for text in read_texts(SAMPLE_CORPUS) for s in re.split(r"(?<=[.!?])\s+", text) if s]


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL of conversations; returns the number written."""
    pool = sentences()
    rng = np.random.default_rng(seed)
    target, written, count = int(megabytes * 1e6), 0, 0
    roles = ("user", "assistant")
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            turns = 2 * int(rng.integers(1, 5))
            messages = [{"role": roles[i % 2], "content": " ".join(pool[j] for j in rng.integers(0, len(pool),
                                                                   int(rng.integers(2, 20))))} for i in range(turns)]
            line = json.dumps({"id": f"c{count}", "messages": messages}) + "\n"
            f.write(line)
            written += len(line.encode())
            count += 1
    return count


def make_long(path: Path, megabytes: float) -> None:
    pool = sentences()
    parts, size = [], 0
    for i in range(10 ** 9):
        parts.append(pool[i % len(pool)])
        size += len(parts[-1]) + 1
        if size >= megabytes * 1e6:
            break
    record = {"messages": [{"role": "user", "content": "Summarise the literature."},
                           {"role": "assistant", "content": " ".join(parts)}]}
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")


def prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    """One `data prepare` in its own process: wall seconds and its peak RSS (MB)."""
    code = ("import resource, sys, time; from llamajobs.cli import main; t = time.perf_counter()\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('BENCH', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)")
    argv = ["llamajobs", "data", "prepare", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out),
            "--format", "messages", "--workers", str(workers), "--force"]
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = {argv!r}\n{code}"], cwd=REPO,
                            capture_output=True, text=True)
    line = [x for x in result.stderr.splitlines() if x.startswith("BENCH")]
    if result.returncode or not line:
        sys.exit(f"data prepare failed:\n{result.stderr[-3000:]}")
    _, seconds, own, children = line[-1].split()
    return {"seconds": float(seconds), "peak_rss_mb": max(int(own), int(children)) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--long-mb", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result: dict = {"cpus": len(os.sched_getaffinity(0)), "workers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from tests.families import train_fast_tokenizer

            train_fast_tokenizer("qwen2", tokenizer := root / "tokenizer")
        corpus = root / "chat.jsonl"
        result["conversations"] = make_corpus(corpus, args.mb)
        size = corpus.stat().st_size
        for workers in map(int, args.workers.split(",")):
            runs = [prepare(corpus, tokenizer, root / "store", workers) for _ in range(args.repeat)]
            best = min(r["seconds"] for r in runs)
            result["workers"][workers] = {"seconds": best, "mb_per_s": size / 1e6 / best}
        first = result["workers"][min(result["workers"])]
        for r in result["workers"].values():
            r["speed_vs_fewest_workers"] = first["seconds"] / r["seconds"]
        if args.long_mb:
            long = root / "long.jsonl"
            make_long(long, args.long_mb)
            empty = root / "empty.jsonl"
            make_long(empty, 0.000001)
            base = prepare(empty, tokenizer, root / "store", 1)["peak_rss_mb"]
            run = prepare(long, tokenizer, root / "store", 1)
            result["long_message"] = {"mb": long.stat().st_size / 1e6, "seconds": run["seconds"],
                                      "peak_rss_mb": run["peak_rss_mb"], "baseline_rss_mb": base,
                                      "above_baseline_per_input_byte": (run["peak_rss_mb"] - base) * 2**20
                                      / long.stat().st_size}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['conversations']:,} conversations, {size / 1e6:.1f} MB, {result['cpus']} CPUs")
    for workers, r in result["workers"].items():
        print(f"data prepare --workers {workers}: {r['mb_per_s']:.2f} MB/s, {r['seconds']:.1f} s, "
              f"{r['speed_vs_fewest_workers']:.2f}x the fewest workers'")
    if "long_message" in result:
        m = result["long_message"]
        print(f"one {m['mb']:.1f} MB message: {m['seconds']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB "
              f"({m['baseline_rss_mb']:.0f} MB for a one-line conversation: "
              f"{m['above_baseline_per_input_byte']:.1f}x the input above it)")


if __name__ == "__main__":
    main()
