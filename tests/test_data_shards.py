"""Sharded `data prepare`: the plan, one array task per shard on the local cluster and on the real
SLURM cluster, restarts after a crashed or killed shard, and memory that does not grow with the corpus.

"The same store" means equal store.content_digest (every document's tokens end to end, their
lengths, the loss masks, for the train and the eval split) and equal meta.json counts (documents,
tokens, max token id, skipped lines with their file:line, per-source documents); the part files
themselves differ only in where the shards cut.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamajobs.data import prepare as prep
from llamajobs.data import shard_plan as sp
from llamajobs.data import sharded_prepare as sharded
from llamajobs.data import shards as sh
from llamajobs.data import store as st
from llamajobs.data.inspect import describe
from llamajobs.errors import Failure, SpecError
from tests.test_data import corpus, real_tok, write_jsonl  # noqa: F401 (real_tok: a fixture)

COUNTS = ("documents", "tokens", "max_token_id", "dtype", "format", "vocab_size", "tokenizer", "skipped_empty",
          "skipped_bad_lines", "bad_line_examples", "sources", "eval_fraction", "eval", "loss_mask")


def same_store(a: Path, b: Path) -> None:
    assert st.content_digest(a) == st.content_digest(b)
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert {k: meta_a.get(k) for k in COUNTS} == {k: meta_b.get(k) for k in COUNTS}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A directory: a.jsonl (most of the bytes, cut by the shards; a bad line and an empty text
    late in it), sub/b.jsonl.gz (stays whole), c.jsonl. Two thirds of the documents have ids."""
    root = tmp_path_factory.mktemp("corpus") / "in"
    (root / "sub").mkdir(parents=True)
    docs = [{k: v for k, v in d.items() if k != "id" or i % 3} for i, d in enumerate(corpus(360))]
    lines = [json.dumps(d) for d in docs[:240]]
    lines[200:200] = ['{"text": broken', '{"text": ""}']
    write_jsonl(root / "a.jsonl", lines)
    write_jsonl(root / "sub" / "b.jsonl.gz", docs[240:300], gz=True)
    write_jsonl(root / "c.jsonl", docs[300:])
    return root


@pytest.fixture(scope="module")
def reference(inputs, real_tok, tmp_path_factory) -> Path:
    """The same corpus prepared by one process (no shards)."""
    out = tmp_path_factory.mktemp("reference") / "store"
    prep.prepare(prep.PrepareConfig(inputs=(inputs,), tokenizer=real_tok, out=out, skip_bad_lines=True,
                                    eval_fraction=0.1))
    return out


def config(inputs: Path, tok: Path, out: Path, **kw) -> prep.PrepareConfig:
    return prep.PrepareConfig(inputs=(inputs,), tokenizer=tok, out=out, skip_bad_lines=True, eval_fraction=0.1, **kw)


# --- the plan ---


def test_split_is_contiguous_balanced_and_keeps_whole_files_whole():
    lines = 100  # a cuttable file is cut at multiples of 100 bytes (its "lines")

    def align(_, offset):
        return -(-offset // lines) * lines

    runs = sp.split([4000, 0, 1000, 3000], [True, True, False, True], 4, align)
    assert [[(p.source, p.start, p.end, p.whole) for p in run] for run in runs] == [
        [(0, 0, 2000, False)], [(0, 2000, 4000, False)], [(2, 0, 1000, True), (3, 0, 1000, False)],
        [(3, 1000, 3000, False)]]
    many = sp.split([10] * 12, [False] * 12, 4, align)  # many whole files: split by files
    assert [[p.source for p in run] for run in many] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    few = sp.split([10, 10], [False, False], 4, align)  # fewer files than shards: fewer shards
    assert [[p.source for p in run] for run in few] == [[0], [1]]
    assert sp.split([0, 0], [True, True], 3, align) == []


def test_plan_cuts_at_line_starts_by_bytes(inputs, real_tok, tmp_path):
    plan = sp.make_plan(config(inputs, real_tok, tmp_path / "s"), 4, prep.Encoder(real_tok))
    files = prep.resolve_inputs((inputs,))
    assert [f.relative_to(inputs).as_posix() for f in files] == ["a.jsonl", "c.jsonl", "sub/b.jsonl.gz"]
    assert plan["given"] == [str(f) for f in files]
    total = sum(f.stat().st_size for f in files)
    longest = max(len(line) for line in (inputs / "a.jsonl").read_bytes().splitlines(keepends=True))
    data = (inputs / "a.jsonl").read_bytes()
    seen = []
    for shard in plan["shards"]:
        assert abs(shard["bytes"] - total / 4) <= max(longest, (inputs / "sub" / "b.jsonl.gz").stat().st_size)
        for source, start, end, whole in shard["pieces"]:
            seen.append((source, start, end))
            if source == 0:
                assert start == 0 or data[start - 1:start] == b"\n"
            if files[source].suffix == ".gz":
                assert whole
    assert [s for s in seen if s[0] == 0][0][1] == 0 and sorted(seen) == seen, "contiguous, in input order"
    assert sum(end - start for _, start, end in seen) == total


def test_shard_errors_name_the_file_line_and_tokenizer_is_checked(inputs, real_tok, reference, tmp_path):
    """In process (no cluster): a bad line deep in a cut file is reported at its file line, as one
    process reports it; a shard seeing another tokenizer, or a merge of one, is refused."""
    cfg = prep.PrepareConfig(inputs=(inputs,), tokenizer=real_tok, out=tmp_path / "s", eval_fraction=0.1)
    work, plan = sp.open_work(cfg, 4, prep.Encoder(real_tok))
    with pytest.raises(SpecError) as one:
        prep.prepare(prep.PrepareConfig(inputs=(inputs,), tokenizer=real_tok, out=tmp_path / "one"))
    errors = []
    for k in range(len(plan["shards"])):
        try:
            sp.run_shard(str(work), k)
        except SpecError as e:
            errors.append((k, str(e)))
    (k, message), = errors
    assert k > 0 and plan["shards"][k]["pieces"][0][1] > 0, "the bad line is in a piece that starts mid-file"
    assert message == str(one.value) and ":201: not valid JSON" in message
    assert json.loads(sh.failed_path(work, k).read_text())["error"] == message
    assert sh.describe_work(work)["counts"] == {"done": 3, "failed": 1}

    work, plan = sp.open_work(config(inputs, real_tok, tmp_path / "t"), 2, prep.Encoder(real_tok))
    for k in range(2):
        sp.run_shard(str(work), k)
    marker = json.loads(sh.marker_path(work, 1).read_text())
    sh.write_json_atomic(sh.marker_path(work, 1), {**marker, "fingerprint": "0" * 64, "host": "n9"})
    with pytest.raises(SpecError, match="shard 1 was tokenized on n9 with tokenizer 0000000000000000"):
        sharded.merge(work, plan)
    sh.write_json_atomic(sh.marker_path(work, 1), marker)
    plan["tokenizer"]["fingerprint"] = "f" * 64
    sh.write_json_atomic(work / sh.PLAN, plan)
    sh.marker_path(work, 1).unlink()
    with pytest.raises(SpecError, match="has fingerprint .* but the plan was made with ffffffffffffffff"):
        sp.run_shard(str(work), 1)


def test_a_merge_whose_eval_split_took_every_document_is_refused(tmp_path, tokenizer_dir):
    from tests.test_data import ids_held_out

    f = write_jsonl(tmp_path / "held.jsonl", ids_held_out(0.5, True, 6))
    cfg = prep.PrepareConfig(inputs=(f,), tokenizer=tokenizer_dir, out=tmp_path / "s", eval_fraction=0.5)
    work, plan = sp.open_work(cfg, 2, prep.Encoder(tokenizer_dir))
    for k in range(len(plan["shards"])):
        sp.run_shard(str(work), k)
    with pytest.raises(SpecError, match=r"--eval-fraction 0\.5: all 6 documents went to the eval split .* none"):
        sharded.merge(work, plan)
    assert not (work / st.META).exists()


def test_rerun_with_other_settings_is_refused_unless_forced(inputs, real_tok, tmp_path):
    out = tmp_path / "s"
    sp.open_work(config(inputs, real_tok, out), 4, prep.Encoder(real_tok))
    with pytest.raises(SpecError, match=r"other --eval-fraction, --shards; rerun with its arguments"):
        sp.open_work(prep.PrepareConfig(inputs=(inputs,), tokenizer=real_tok, out=out, skip_bad_lines=True), 2,
                     prep.Encoder(real_tok))
    old = json.loads((sh.work_dir(out) / sh.PLAN).read_text())
    work, plan = sp.open_work(prep.PrepareConfig(inputs=(inputs,), tokenizer=real_tok, out=out, skip_bad_lines=True,
                                                 force=True), 2, prep.Encoder(real_tok))
    assert plan["settings"]["shards"] == 2 and plan["settings"]["eval_fraction"] == 0 and plan["id"] != old["id"]
    # a job of the discarded plan that still runs publishes nothing, and its marker would not count
    with pytest.raises(Failure, match="was restarted .--force. while shard 0 ran"):
        sp.prepare_shard(work, old, 0, work / sh.WORK_DIR / "stale", 1, prep.CHUNK_BYTES)
    assert not (work / st.part_name(0)).exists()
    sp.run_shard(str(work), 0)
    marker = json.loads(sh.marker_path(work, 0).read_text())
    sh.write_json_atomic(sh.marker_path(work, 0), {**marker, "plan": old["id"]})
    assert sh.read_marker(work, 0, plan["id"]) is None and sh.describe_work(work)["counts"] == {"pending": 2}


def test_a_work_directory_llamajobs_did_not_make_is_left_alone(inputs, real_tok, tmp_path):
    out = tmp_path / "s"
    mine = sh.work_dir(out)
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    for force in (False, True):
        with pytest.raises(SpecError, match=r"s.parts exists and holds no preparation of llamajobs .* left as it is"):
            sp.open_work(config(inputs, real_tok, out, force=force), 2, prep.Encoder(real_tok))
    assert (mine / "notes.txt").read_text() == "the user's"
    (mine / "notes.txt").unlink()
    (mine / sh.SHARDS_DIR).mkdir()  # what a start that stopped before its plan leaves: taken over
    (mine / sh.PLAN).write_text("{ torn")
    with pytest.raises(SpecError, match="holds no preparation"):  # a torn plan is not known to be ours
        sp.open_work(config(inputs, real_tok, out), 2, prep.Encoder(real_tok))
    (mine / sh.PLAN).unlink()
    work, plan = sp.open_work(config(inputs, real_tok, out), 2, prep.Encoder(real_tok))
    assert work == mine and plan["kind"] == sh.PLAN_KIND


# --- the local cluster ---


def test_local_four_shards_give_the_one_process_store(cli, inputs, real_tok, reference, tmp_path):
    out = tmp_path / "store"
    code, stdout, stderr = cli("data", "prepare", str(inputs), "--tokenizer", str(real_tok), "--out", str(out),
                               "--skip-bad-lines", "--eval-fraction", "0.1", "--shards", "4", "--cluster", "local",
                               "--json")
    assert code == 0, stderr
    meta = json.loads(stdout)
    same_store(out, reference)
    assert [p["name"] for p in meta["parts"]] == [st.part_name(k) for k in range(4)]
    assert meta["preparation"]["shards"] == 4 and meta["preparation"]["cluster"] == "local"
    assert meta["bad_line_examples"] == [f"{inputs / 'a.jsonl'}:201: not valid JSON (Expecting value at column 10)"]
    assert sorted(p.name for p in out.iterdir()) == ["eval", "meta.json"] + [st.part_name(k) for k in range(4)]
    assert not sh.work_dir(out).exists()
    assert len(st.TokenStore(out)) == len(st.TokenStore(reference))


def test_killed_shard_is_redone_alone(inputs, real_tok, reference, tmp_path, monkeypatch):
    """SIGKILL in the middle of shard 2 (after its first chunk is on disk): the command fails naming
    it, inspect shows it, and a rerun runs shard 2 only; the other parts are not rewritten."""
    out = tmp_path / "store"
    cluster = sharded.ClusterConfig(shards=4, cluster="local", poll_s=0.1)
    monkeypatch.setenv(sp.FAULT_ENV, "kill:2")
    with pytest.raises(Failure, match=r"shard 2 of 4: job \d+ ended without finishing the shard .* 3 of 4 shards are "
                                      r"finished and kept: rerun the same command"):
        sharded.prepare_sharded(config(inputs, real_tok, out, chunk_bytes=2000), cluster)
    monkeypatch.delenv(sp.FAULT_ENV)
    with pytest.raises(SpecError, match=r"a sharded prepare is unfinished in store.parts: `llamajobs data inspect"):
        st.TokenStore(out)
    info = describe(out)
    assert info["unfinished"] and [r["state"] for r in info["shards"]] == ["done", "done", "killed", "done"]
    work = sh.work_dir(out)
    (partial,) = (work / sh.WORK_DIR).glob("shard-00002.*")
    assert (partial / st.part_name(2) / st.TOKENS).stat().st_size > 0, "killed mid-way, not before it started"
    kept = {k: (work / st.part_name(k) / st.TOKENS).stat().st_mtime_ns for k in (0, 1, 3)}

    meta = sharded.prepare_sharded(config(inputs, real_tok, out, chunk_bytes=2000), cluster)
    first, second = meta["preparation"]["commands"]
    assert sorted(first["submitted"]) == ["0", "1", "2", "3"] and list(second["submitted"]) == ["2"]
    assert {k: (out / st.part_name(k) / st.TOKENS).stat().st_mtime_ns for k in (0, 1, 3)} == kept
    same_store(out, reference)


def test_no_wait_leaves_stdio_alone_and_a_rerun_adopts_running_shards(cli, inputs, real_tok, reference, tmp_path):
    """--no-wait returns while a shard still runs (the local controllers hold none of our pipes);
    the rerun waits for that shard's job instead of submitting it again."""
    out = tmp_path / "store"
    args = ["data", "prepare", str(inputs), "--tokenizer", str(real_tok), "--out", str(out), "--skip-bad-lines",
            "--eval-fraction", "0.1", "--shards", "4", "--cluster", "local"]
    started = time.monotonic()
    first = subprocess.run([sys.executable, "-m", "llamajobs", *args, "--no-wait", "--json"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, sp.FAULT_ENV: "stall:1:4"})
    assert first.returncode == 0, first.stderr
    assert time.monotonic() - started < 30
    assert not sh.marker_path(sh.work_dir(out), 1).exists(), "returned while shard 1 runs"
    assert json.loads(first.stdout)["unfinished"]
    code, stdout, _ = cli("data", "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["shards"][1]["state"] in ("submitted", "running")
    code, stdout, stderr = cli("data", "inspect", str(out))
    assert code == 0 and "unfinished sharded preparation" in stdout

    code, stdout, stderr = cli(*args, "--json")
    assert code == 0, stderr
    commands = json.loads(stdout)["preparation"]["commands"]
    assert "1" in commands[1]["adopted"] and "1" not in commands[1]["submitted"]
    same_store(out, reference)


def test_peak_memory_does_not_grow_with_the_corpus(real_tok, tmp_path):
    """One shard over 1 MB and over 10 MB of JSONL: the task's peak RSS (its own getrusage) grows
    by a few MB of allocator noise at most. Keeping the 10 MB corpus's 2.4M tokens in memory would
    add about 10 MB as a uint32 array, about 90 MB as Python lists."""
    texts = [d["text"] * 3 for d in corpus(200)]
    peaks, tokens = {}, {}
    for mb in (1, 10):
        path = tmp_path / f"c{mb}.jsonl"
        with open(path, "w") as f:
            i = written = 0
            while written < mb * 1e6:
                line = json.dumps({"id": f"d{i}", "text": f"{texts[i % len(texts)]} {i}"}) + "\n"
                written += f.write(line)
                i += 1
        meta = sharded.prepare_sharded(prep.PrepareConfig(inputs=(path,), tokenizer=real_tok, out=tmp_path / f"s{mb}",
                                                     chunk_bytes=1 << 16),
                                  sharded.ClusterConfig(shards=1, cluster="local", poll_s=0.1))
        (stats,) = meta["preparation"]["shard_stats"]
        peaks[mb], tokens[mb] = stats["peak_rss_bytes"], meta["tokens"]
    assert tokens[10] > 9 * tokens[1]
    assert peaks[10] < 1.1 * peaks[1] and peaks[10] - peaks[1] < 6e6, peaks


# --- the real SLURM cluster ---


@pytest.mark.slurm
def test_slurm_array_crashed_shard_rerun_gives_the_one_process_store(slurm, cli, inputs, real_tok, reference,
                                                                   tmp_path, monkeypatch):
    """Four array tasks on nodes n1/n2; shard 2 crashes mid-way; inspect shows it failed. A rerun
    with --no-wait submits shard 2 alone (it stalls a while); the next rerun adopts that job (sacct
    says it is live) instead of submitting it again, and the merged store is the one-process store."""
    out = tmp_path / "store"
    args = ["data", "prepare", str(inputs), "--tokenizer", str(real_tok), "--out", str(out), "--skip-bad-lines",
            "--eval-fraction", "0.1", "--shards", "4", "--cluster", "slurm", "--time", "00:05:00", "--json"]
    monkeypatch.setenv(sp.FAULT_ENV, "crash:2")
    code, _, stderr = cli(*args)
    assert code == 1 and "shard 2 of 4: LLAMAJOBS_DATA_FAULT: injected crash (on n" in stderr, stderr
    code, stdout, _ = cli("data", "inspect", str(out), "--json")
    rows = json.loads(stdout)["shards"]
    assert [r["state"] for r in rows] == ["done", "done", "failed", "done"]
    assert {r["host"] for r in rows} <= set(slurm.nodes)
    kept = {k: (sh.work_dir(out) / st.part_name(k) / st.TOKENS).stat().st_mtime_ns for k in (0, 1, 3)}

    monkeypatch.setenv(sp.FAULT_ENV, "stall:2:4")
    code, stdout, stderr = cli(*args, "--no-wait")
    monkeypatch.delenv(sp.FAULT_ENV)
    assert code == 0 and json.loads(stdout)["unfinished"], stderr
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    meta = json.loads(stdout)
    first, second, third = meta["preparation"]["commands"]
    assert list(second["submitted"]) == ["2"] and second["submitted"]["2"] != first["submitted"]["2"]
    assert third == {"cluster": "slurm", "submitted": {}, "adopted": {"2": second["submitted"]["2"]}}
    assert {s["host"] for s in meta["preparation"]["shard_stats"]} <= set(slurm.nodes)
    assert {k: (out / st.part_name(k) / st.TOKENS).stat().st_mtime_ns for k in (0, 1, 3)} == kept
    same_store(out, reference)
    assert np.array_equal(st.TokenStore(out)[-1], st.TokenStore(reference)[-1])
