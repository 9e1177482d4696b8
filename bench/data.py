"""Data pipeline throughput: `data prepare` against a plain sentencepiece loop, the same vocabulary as a
Hugging Face fast tokenizer (tokenizer.json: a plain loop, batched encoding in the Rust library's
threads, and `data prepare` with it), and random document access from a token store against what one
GPU consumes.

The corpus is generated: sentences of the bundled PMC sample, shuffled with a fixed seed into
paper-length documents (lognormal, median about 20 kB of text, like full PMC articles), about
--mb megabytes of JSONL. The tokenizer is the real LLaMA-style 32k model from mistral-common.

    python bench/data.py [--mb 80] [--workers 1,2] [--repeat 2] [--json]
    python bench/data.py --mb 40 --shards 1,4 --cluster local [--only-shards]

Rates: MB/s of JSONL read, tokens/s written. "per process" divides by the worker processes (the
main process reads, orders and writes; with --workers 1 it also tokenises).

--shards times sharded preparation (`data prepare --shards N --cluster C`, one array task per
shard, --workers 1 each) of the same corpus: the command's wall time, the slowest shard, the peak
RSS of the largest shard process (its own getrusage) and the merge; each sharded store is checked
to hold the same documents as the first (store.content_digest). On the local cluster at most
CPUs shards run at once; on SLURM as many as the cluster schedules.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llamajobs.data import SAMPLE_CORPUS, read_texts  # noqa: E402
from llamajobs.data.prepare import PrepareConfig, prepare  # noqa: E402
from llamajobs.data.store import TokenStore, content_digest  # noqa: E402

GPU_TOKENS_PER_S = 20_000  # LoRA 7B on one GPU, seq 512 (DESIGN.md: 14-19k on an H200)
SEQ_LEN = 512


def tokenizer_model() -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        sys.exit("pip install --no-deps mistral-common (its tokenizer.model.v1 is the LLaMA-style 32k model)")
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """JSONL of paper-length documents of shuffled sample sentences; returns (documents, bytes)."""
    sentences = [s for text in read_texts(SAMPLE_CORPUS) for s in re.split(r"(?<=[.!?])\s+", text) if s]
    rng = np.random.default_rng(seed)
    mean_sentence = np.mean([len(s) + 1 for s in sentences])
    target = int(megabytes * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            chars = min(rng.lognormal(np.log(20_000), 0.6), 200_000)
            picks = rng.integers(0, len(sentences), max(1, int(chars / mean_sentence)))
            chunks = np.array_split(picks, max(1, len(picks) // 8))  # paragraphs of about 8 sentences
            paragraphs = [" ".join(sentences[i] for i in chunk) for chunk in chunks]
            line = json.dumps({"id": f"PMC{docs}", "text": "\n\n".join(paragraphs)}) + "\n"
            f.write(line)
            written += len(line.encode())
            docs += 1
    return docs, written


def plain_loop(corpus: Path, model: Path) -> dict:
    """What one would write by hand: parse each line, sp.encode its text, keep the ids."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    with open(corpus, "rb") as f:
        for line in f:
            tokens += len(sp.encode(json.loads(line)["text"])) + 2
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    size = corpus.stat().st_size
    return {"seconds": seconds, "mb_per_s": size / 1e6 / seconds, "tokens_per_s": tokens / seconds, "tokens": tokens,
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu}


def fast_tokenizer_dir(model: Path, root: Path) -> Path:
    """The same 32k vocabulary as a Hugging Face fast tokenizer: tokenizer.json (+ its config) only, so
    that `data prepare` encodes with it, not with sentencepiece."""
    from transformers import LlamaTokenizer

    source, out = root / "spm", root / "fast"
    source.mkdir()
    shutil.copyfile(model, source / "tokenizer.model")
    LlamaTokenizer.from_pretrained(source, add_bos_token=True).save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    return out


def fast_rates(corpus: Path, tokenizer_dir: Path, batch: int = 256) -> dict:
    """tokenizers' Tokenizer on the corpus: one encode per document, then encode_batch of `batch`
    documents (multi-threaded in Rust: TOKENIZERS_PARALLELISM on for this row only)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # "</s>" in a paper is text: the same work as data prepare's
    size, result = corpus.stat().st_size, {}
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    for name, batched in (("loop", False), ("batched", True)):
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if batched else "false"
        start, cpu, tokens = time.perf_counter(), cpu_seconds(), 0
        with open(corpus, "rb") as f:
            texts = [json.loads(line)["text"] for line in f]
        if batched:
            for i in range(0, len(texts), batch):
                tokens += sum(len(e.ids) + 2 for e in tokenizer.encode_batch(texts[i:i + batch], add_special_tokens=False))
        else:
            tokens = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 2 for t in texts)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        result[name] = {"seconds": seconds, "mb_per_s": size / 1e6 / seconds, "tokens_per_s": tokens / seconds,
                        "tokens": tokens, "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu}
    if before is None:
        os.environ.pop("TOKENIZERS_PARALLELISM")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = before
    return result


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers, once it has closed)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _busy(n: int) -> float:
    start = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - start


def parallel_capacity(processes: int, n: int = 10_000_000) -> float:
    """How many CPUs this machine gives now: processes x one busy loop's time / their wall time
    (other work on a shared 2-core box lowers it; scaling figures are judged against it)."""
    import multiprocessing

    one = _busy(n)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_busy, [1000] * processes)  # started
        start = time.perf_counter()
        pool.map(_busy, [n] * processes)
        return processes * one / (time.perf_counter() - start)


def run_prepare(corpus: Path, model: Path, out: Path, workers: int) -> dict:
    start, cpu = time.perf_counter(), cpu_seconds()
    meta = prepare(PrepareConfig(inputs=(corpus,), tokenizer=model, out=out, workers=workers))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    size = corpus.stat().st_size
    tokens = meta["tokens"]
    return {"workers": workers, "seconds": seconds, "mb_per_s": size / 1e6 / seconds, "tokens_per_s": tokens / seconds,
            "mb_per_s_per_process": size / 1e6 / seconds / workers,
            "tokens_per_s_per_process": tokens / seconds / workers,
            "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu, "tokens": tokens, "documents": meta["documents"]}


def run_sharded(corpus: Path, model: Path, out: Path, shards: int, cluster: str) -> dict:
    from llamajobs.data.sharded_prepare import ClusterConfig, prepare_sharded

    start = time.perf_counter()
    meta = prepare_sharded(PrepareConfig(inputs=(corpus,), tokenizer=model, out=out),
                           ClusterConfig(shards=shards, cluster=cluster, poll_s=0.2))
    seconds = time.perf_counter() - start
    prep = meta["preparation"]
    stats = prep["shard_stats"]
    return {"shards": prep["shards"], "cluster": cluster, "seconds": seconds,
            "mb_per_s": corpus.stat().st_size / 1e6 / seconds, "tokens_per_s": meta["tokens"] / seconds,
            "slowest_shard_s": max(s["seconds"] for s in stats), "sum_shard_s": sum(s["seconds"] for s in stats),
            "peak_rss_mb": max(s["peak_rss_bytes"] for s in stats) / 1e6, "merge_s": prep["merge_seconds"],
            "hosts": sorted({s["host"] for s in stats}), "tokens": meta["tokens"], "documents": meta["documents"],
            "digest": content_digest(out)}


def sharded(corpus: Path, model: Path, root: Path, counts: list[int], cluster: str) -> list[dict]:
    runs = []
    for n in counts:
        out = root / f"sharded-{n}"
        shutil.rmtree(out, ignore_errors=True)
        runs.append(run_sharded(corpus, model, out, n, cluster))
    for r in runs[1:]:
        if r["digest"] != runs[0]["digest"]:
            sys.exit(f"--shards {r['shards']} gave another store than --shards {runs[0]['shards']}")
    for r in runs:
        r["same_store_as_first"] = True
        del r["digest"]
    return runs


def sampler_rate(store_dir: Path, seconds: float = 5.0) -> dict:
    """Tokens/s one rank draws: raw random windows from the memory map, and WindowSampler's batches
    (windows copied into int64 torch tensors), both with the pages cold at the start."""
    from llamajobs.data.sampler import WindowSampler

    store = TokenStore(store_dir)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    drawn = 0
    while time.perf_counter() - start < seconds / 2:
        for doc in rng.integers(0, len(store), 1000):
            tokens = store[int(doc)]
            s = int(rng.integers(0, max(1, len(tokens) - SEQ_LEN)))
            drawn += len(np.asarray(tokens[s:s + SEQ_LEN + 1], dtype=np.int64)) - 1
    raw = drawn / (time.perf_counter() - start)

    sampler = WindowSampler(store, seq_len=SEQ_LEN, global_batch=64, micro_batch=8, rank=0, world_size=1,
                            seed=0, pad_id=2)
    start = time.perf_counter()
    batches = 0
    while time.perf_counter() - start < seconds / 2:
        next(sampler)
        batches += 1
    window = batches * 64 * SEQ_LEN / (time.perf_counter() - start)
    return {"random_windows_tokens_per_s": raw, "window_sampler_tokens_per_s": window,
            "vs_one_gpu": window / GPU_TOKENS_PER_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=80, help="corpus size in MB of JSONL")
    parser.add_argument("--workers", default="1,2", help="comma list of --workers values to time")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the fastest counts")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shards", default="", help="comma list of --shards values to time (sharded preparation)")
    parser.add_argument("--cluster", default="local", help="where the shards run: local or slurm")
    parser.add_argument("--only-shards", action="store_true", help="time sharded preparation only")
    args = parser.parse_args()
    model = tokenizer_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        t = time.perf_counter()
        docs, size = make_corpus(corpus, args.mb)
        result: dict = {"cpus": os.cpu_count(), "corpus": {"documents": docs, "bytes": size,
                                                           "generated_in_s": time.perf_counter() - t}}
        if args.shards:
            result["sharded"] = sharded(corpus, model, root, [int(n) for n in args.shards.split(",")], args.cluster)
        if args.only_shards:
            print_sharded(result) if not args.json else print(json.dumps(result, indent=2))
            return
        # best of --repeat: the machine may be shared, and other work only ever slows a run down
        result["plain_loop"] = min((plain_loop(corpus, model) for _ in range(args.repeat)), key=lambda r: r["seconds"])
        result["prepare"] = []
        result["cpus_available"] = {}
        for workers in map(int, args.workers.split(",")):
            result["cpus_available"][workers] = parallel_capacity(workers)
            out = root / f"store-{workers}"
            runs = []
            for attempt in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_prepare(corpus, model, out, workers))
            r = min(runs, key=lambda r: r["seconds"])
            r["vs_plain_loop_per_process"] = r["tokens_per_s_per_process"] / result["plain_loop"]["tokens_per_s"]
            r["vs_plain_loop_total"] = r["tokens_per_s"] / result["plain_loop"]["tokens_per_s"]
            # robust to other work on the machine: tokens per CPU-second of all our processes
            r["vs_plain_loop_per_cpu_s"] = r["tokens_per_cpu_s"] / result["plain_loop"]["tokens_per_cpu_s"]
            result["prepare"].append(r)
        fast_dir = fast_tokenizer_dir(model, root)
        result["fast"] = min((fast_rates(corpus, fast_dir) for _ in range(args.repeat)),
                             key=lambda r: r["batched"]["seconds"])
        result["fast"]["prepare"] = []
        for workers in map(int, args.workers.split(",")):
            out = root / f"fast-store-{workers}"
            runs = []
            for attempt in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                runs.append(run_prepare(corpus, fast_dir, out, workers))
            r = min(runs, key=lambda r: r["seconds"])
            loop = result["fast"]["loop"]
            r["vs_fast_loop_per_process"] = r["tokens_per_s_per_process"] / loop["tokens_per_s"]
            r["vs_fast_loop_total"] = r["tokens_per_s"] / loop["tokens_per_s"]
            r["vs_fast_loop_per_cpu_s"] = r["tokens_per_cpu_s"] / loop["tokens_per_cpu_s"]
            result["fast"]["prepare"].append(r)
        store_dir = root / f"store-{result['prepare'][0]['workers']}"
        store_bytes = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())
        tokens = result["prepare"][0]["tokens"]
        result["store"] = {"bytes": store_bytes, "tokens": tokens,
                           "bytes_per_billion_tokens": store_bytes / tokens * 1e9,
                           "tokens_per_jsonl_byte": tokens / size}
        best = max(result["prepare"], key=lambda r: r["mb_per_s"])
        result["one_gb_jsonl_minutes"] = {"workers": best["workers"], "minutes": 1e9 / (best["mb_per_s"] * 1e6) / 60}
        result["sampler"] = sampler_rate(store_dir)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    c, p = result["corpus"], result["plain_loop"]
    print(f"corpus: {c['documents']:,} documents, {c['bytes'] / 1e6:.1f} MB JSONL, {result['cpus']} CPUs "
          f"(free now, by a busy loop in N processes: "
          + ", ".join(f"{n}: {v:.2f}" for n, v in result["cpus_available"].items()) + ")")
    print(f"plain sentencepiece loop (1 process): {p['mb_per_s']:.2f} MB/s, {p['tokens_per_s']:,.0f} tokens/s")
    for r in result["prepare"]:
        print(f"data prepare --workers {r['workers']}: {r['mb_per_s']:.2f} MB/s, {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['tokens_per_s_per_process']:,.0f} per process; "
              f"x{r['vs_plain_loop_per_process']:.2f} the plain loop "
              f"per process, x{r['vs_plain_loop_total']:.2f} in total) in {r['seconds']:.1f} s; "
              f"{r['tokens_per_cpu_s']:,.0f} tokens per CPU-second, "
              f"x{r['vs_plain_loop_per_cpu_s']:.2f} the plain loop's "
              f"{p['tokens_per_cpu_s']:,.0f}")
    f = result["fast"]
    for name, label in (("loop", "plain loop (1 process)"), ("batched", "encode_batch (Rust threads)")):
        r = f[name]
        print(f"fast tokenizer.json, {label}: {r['mb_per_s']:.2f} MB/s, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tokens_per_cpu_s']:,.0f} tokens per CPU-second (x{r['tokens_per_s'] / p['tokens_per_s']:.2f} "
              f"the sentencepiece loop)")
    for r in f["prepare"]:
        print(f"data prepare --workers {r['workers']} with tokenizer.json: {r['mb_per_s']:.2f} MB/s, "
              f"{r['tokens_per_s']:,.0f} tokens/s (x{r['vs_fast_loop_per_process']:.2f} the fast plain loop per "
              f"process, x{r['vs_fast_loop_total']:.2f} in total) in {r['seconds']:.1f} s; "
              f"{r['tokens_per_cpu_s']:,.0f} tokens per CPU-second, x{r['vs_fast_loop_per_cpu_s']:.2f} the fast loop's")
    s = result["store"]
    print(f"store: {s['bytes_per_billion_tokens'] / 1e9:.3f} GB per billion tokens; "
          f"{s['tokens_per_jsonl_byte']:.3f} tokens per JSONL byte")
    g = result["one_gb_jsonl_minutes"]
    print(f"1 GB of JSONL: {g['minutes']:.1f} min with --workers {g['workers']} on this machine")
    print_sharded(result)
    r = result["sampler"]
    print(f"sampler: random windows {r['random_windows_tokens_per_s']:,.0f} tokens/s; WindowSampler batches "
          f"{r['window_sampler_tokens_per_s']:,.0f} tokens/s = x{r['vs_one_gpu']:,.0f} one GPU's {GPU_TOKENS_PER_S:,}")


def print_sharded(result: dict) -> None:
    if "sharded" not in result:
        return
    c = result["corpus"]
    print(f"sharded preparation of {c['documents']:,} documents, {c['bytes'] / 1e6:.1f} MB JSONL "
          f"({result['cpus']} CPUs here):")
    for r in result["sharded"]:
        print(f"  --shards {r['shards']} --cluster {r['cluster']}: {r['seconds']:.1f} s ({r['mb_per_s']:.2f} MB/s), "
              f"slowest shard {r['slowest_shard_s']:.1f} s, shards' sum {r['sum_shard_s']:.1f} s, "
              f"peak RSS per shard {r['peak_rss_mb']:.0f} MB, merge {r['merge_s'] * 1e3:.1f} ms, "
              f"hosts {', '.join(r['hosts'])}")


if __name__ == "__main__":
    main()
