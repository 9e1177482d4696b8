"""The data pipeline: formats, the token store, `data prepare` / `data inspect`, samplers over a store.

Real tokenizers: the LLaMA-style 32k sentencepiece model shipped in mistral-common, and a small
one trained here with llamajobs' own trainer. Inputs are written by each test.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from llamajobs.catalog import TINY_VOCAB
from llamajobs.data import SAMPLE_CORPUS, read_texts
from llamajobs.data import formats as fmts
from llamajobs.data import readers
from llamajobs.data import store as st
from llamajobs.data.inspect import describe
from llamajobs.data.prepare import PrepareConfig, held_out, prepare
from llamajobs.errors import SpecError



# --- fixtures and helpers ---


@pytest.fixture(scope="session")
def real_tok() -> Path:
    """The real LLaMA-style 32k tokenizer.model (mistral-common's v1), as a file path."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("mistral-common is not installed (pip install --no-deps mistral-common)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def sp(real_tok: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(real_tok))


def write_jsonl(path: Path, records: list, *, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def run(inputs, tok, out, **kw) -> dict:
    inputs = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    return prepare(PrepareConfig(inputs=tuple(inputs), tokenizer=tok, out=out, **kw))


def tree(path: Path) -> dict[str, bytes]:
    """Every file under a directory, by relative path: for byte-for-byte comparisons."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def corpus(n: int) -> list[dict]:
    texts = list(read_texts(SAMPLE_CORPUS))
    return [{"id": f"doc-{i}", "text": texts[i % len(texts)][(i * 7) % 50:]} for i in range(n)]


ALPACA = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Summarize the finding.", "input": "Aspirin irreversibly inhibits COX-1.",
     "output": "It blocks COX-1."},
]


def split_by_mask(store: st.TokenStore, i: int) -> tuple[list[int], list[int]]:
    tokens, mask = store[i].tolist(), store.loss_mask(i).tolist()
    first = mask.index(1)
    assert all(mask[first:]) and not any(mask[:first]), "the mask is one masked prefix, then targets"
    return tokens[:first], tokens[first:]


# --- the store over plain text ---


def test_text_store_real_tokenizer(tmp_path, real_tok, sp):
    docs = [{"id": "a", "text": "Atrial fibrillation is common."},
            {"text": "   "},  # empty: skipped and counted
            {"id": "b", "text": "A literal <s> and </s> in the text stay text.\nSecond line."},
            {"id": "c", "text": "Ünïcode 漢字 and digits 12345."}]
    meta = run(write_jsonl(tmp_path / "in.jsonl", docs), real_tok, tmp_path / "store")
    store = st.TokenStore(tmp_path / "store")
    assert len(store) == 3 and meta["documents"] == 3 and meta["skipped_empty"] == 1
    assert meta["dtype"] == "uint16" and store.dtype == np.dtype("<u2") and not store.has_loss_mask
    for doc, record in zip(store, [docs[0], docs[2], docs[3]]):
        assert doc.tolist() == [sp.bos_id(), *sp.encode(record["text"]), sp.eos_id()]
        assert (doc == sp.bos_id()).sum() == 1, "exactly one BOS per document"
    assert store.num_tokens == sum(len(d) for d in store) == meta["tokens"]
    assert (tmp_path / "store" / "part-00000" / "tokens.bin").stat().st_size == 2 * store.num_tokens
    assert store.fingerprint == st.fingerprint_of(sp) and store.vocab_size == 32000
    assert store.lengths().tolist() == [len(d) for d in store] and store[-1].tolist() == store[2].tolist()
    assert store.loss_mask(0).tolist() == [0] + [1] * (len(store[0]) - 1)
    assert st.window_tokens_per_epoch(store, 4) == 12
    assert st.window_tokens_per_epoch(store, 10_000) == store.num_tokens - 3


def test_lone_surrogates_become_replacement_characters(tmp_path, real_tok, sp):
    run(write_jsonl(tmp_path / "in.jsonl", ['{"text": "lone \\ud800 and paired \\ud83d\\ude00"}']), real_tok,
        tmp_path / "store")
    assert st.TokenStore(tmp_path / "store")[0][1:-1].tolist() == sp.encode("lone \ufffd and paired \U0001F600")


def test_gzip_input_gives_the_same_store(tmp_path, real_tok):
    docs = corpus(30)
    run(write_jsonl(tmp_path / "a.jsonl", docs), real_tok, tmp_path / "plain")
    run(write_jsonl(tmp_path / "a.jsonl.gz", docs, gz=True), real_tok, tmp_path / "gz")
    a, b = tree(tmp_path / "plain"), tree(tmp_path / "gz")
    assert a.pop("meta.json") != b.pop("meta.json")  # the sources differ, nothing else
    assert a == b


def test_directory_input_is_its_files_in_order(tmp_path, real_tok):
    """A directory gives its files, recursively, in sorted order, without hidden ones."""
    d = tmp_path / "in"
    (d / "z").mkdir(parents=True)
    (d / ".partial.jsonl").write_text("not json\n")
    docs = corpus(20)
    write_jsonl(d / "z" / "b.jsonl.gz", docs[10:], gz=True)
    write_jsonl(d / "a.jsonl", docs[:10])
    meta = run(d, real_tok, tmp_path / "dir")
    run([d / "a.jsonl", d / "z" / "b.jsonl.gz"], real_tok, tmp_path / "files")
    assert tree(tmp_path / "dir") == tree(tmp_path / "files")
    assert [s["documents"] for s in meta["sources"]] == [10, 10]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="INPUT .*empty: a directory without files"):
        run(tmp_path / "empty", real_tok, tmp_path / "x")


def test_tokenizer_direnizer_hf_and_sentencepiece_agree(tmp_path, tokenizer_dir):
    from transformers import LlamaTokenizer

    texts = list(read_texts(SAMPLE_CORPUS))[:10]
    run(write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts]), tokenizer_dir, tmp_path / "store")
    store = st.TokenStore(tmp_path / "store")
    hf = LlamaTokenizer.from_pretrained(tokenizer_dir)
    st.check_store(store, hf, model_vocab_size=TINY_VOCAB)  # the worker's check passes
    for doc, text in zip(store, texts):
        assert doc.tolist() == hf(text)["input_ids"] + [hf.eos_token_id]
    hf_only = tmp_path / "hf-only"  # no tokenizer.model (as LLaMA-3): transformers encodes
    hf_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_only / name).write_bytes((tokenizer_dir / name).read_bytes())
    run(write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts]), hf_only, tmp_path / "hf-store")
    a, b = tree(tmp_path / "store"), tree(tmp_path / "hf-store")
    assert a["part-00000/tokens.bin"] == b["part-00000/tokens.bin"]
    assert st.TokenStore(tmp_path / "hf-store").fingerprint == store.fingerprint


def test_fingerprint_is_stable_and_mismatch_is_refused(tmp_path, real_tok, tokenizer_dir, sp):
    from transformers import LlamaTokenizer

    assert st.fingerprint_of(spm.SentencePieceProcessor(model_file=str(real_tok))) == st.fingerprint_of(sp)
    run(write_jsonl(tmp_path / "in.jsonl", corpus(3)), tokenizer_dir, tmp_path / "store")
    store = st.TokenStore(tmp_path / "store")
    theirs = st.fingerprint_of(sp)
    with pytest.raises(SpecError) as e:
        st.check_store(store, sp)
    message = str(e.value)
    assert store.fingerprint[:16] in message and theirs[:16] in message and "--tokenizer" in message
    hf = LlamaTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(SpecError, match="token id .* vocabulary has 100 ids"):
        st.check_store(store, hf, model_vocab_size=100)


def test_uint32_and_multi_part_reading(tmp_path):
    """A vocabulary over 65536 ids stores uint32; a store of several parts reads as one sequence."""
    assert st.token_dtype(32000) == "uint16" and st.token_dtype(65536) == "uint16"
    assert st.token_dtype(65537) == st.token_dtype(128256) == "uint32"
    root = tmp_path / "store"
    docs = [np.array([1, 70000, 2]), np.array([1, 5, 6, 2]), np.array([1, 2]), np.array([1, 99999, 3, 2])]
    parts = []
    for index, chunk in enumerate([docs[:1], docs[1:]]):
        w = st.PartWriter(root / st.part_name(index), "uint32", with_mask=False)
        w.write(np.concatenate(chunk), np.array([len(d) for d in chunk]))
        parts.append(w.close())
    st.write_json(root / st.META, {"kind": st.KIND, "format_version": 1, "dtype": "uint32", "parts": parts,
                                   "tokens": sum(p["tokens"] for p in parts), "vocab_size": 128256,
                                   "tokenizer": {"fingerprint": "x"}})
    store = st.TokenStore(root)
    assert len(store) == 4 and [d.tolist() for d in store] == [d.tolist() for d in docs]
    assert store[-1].dtype == np.dtype("<u4") and store.lengths().tolist() == [3, 4, 2, 4]
    with pytest.raises(IndexError):
        store[4]
    (root / "part-00001" / "tokens.bin").write_bytes(b"\0" * 4)  # truncated: refused
    with pytest.raises(SpecError, match="damaged"):
        st.TokenStore(root)


# --- formats ---


def test_s2orc_ids_and_eval_split(tmp_path, real_tok, sp):
    records = [{"corpusid": 100 + i, "externalids": {"pubmedcentral": f"PMC{i}" if i % 3 else None},
                "content": {"text": f"Paper {i}: results of trial {i}.", "annotations": {"paragraph": "[]"}}}
               for i in range(60)]
    meta = run(write_jsonl(tmp_path / "s2.jsonl", records), real_tok, tmp_path / "store", format="s2orc",
               eval_fraction=0.25)
    train, held = st.TokenStore(tmp_path / "store"), st.TokenStore(tmp_path / "store" / "eval")
    assert st.TokenStore(tmp_path / "store").eval_split().meta == held.meta
    assert meta["eval"]["documents"] == len(held) and len(train) + len(held) == 60 and 0 < len(held) < 30
    ids = [r["externalids"]["pubmedcentral"] or str(r["corpusid"]) for r in records]
    expected = [i for i, doc_id in enumerate(ids) if held_out("id:" + doc_id, 0.25)]
    assert [sp.decode(d.tolist()) for d in held] == [records[i]["content"]["text"] for i in expected]
    with pytest.raises(SpecError, match=r's2\.jsonl:2: missing field "content.text"; --format s2orc expects'):
        run(write_jsonl(tmp_path / "s2.jsonl", [records[0], {"content": {}}]), real_tok, tmp_path / "x", format="s2orc")


def test_alpaca_prompt_masked_response_and_eos_trained(tmp_path, real_tok, sp):
    pretty = tmp_path / "alpaca.json"
    pretty.write_text(json.dumps(ALPACA + [{"instruction": "Empty.", "input": "", "output": ""}], indent=2))
    meta = run(pretty, real_tok, tmp_path / "list", format="alpaca")
    store = st.TokenStore(tmp_path / "list")
    assert meta["loss_mask"] == "uint8" and store.has_loss_mask and len(store) == 2 and meta["skipped_empty"] == 1
    for i, record in enumerate(ALPACA):
        prompt, response = split_by_mask(store, i)
        assert prompt[0] == sp.bos_id() and (store[i] == sp.bos_id()).sum() == 1
        assert sp.decode(prompt[1:]) == fmts.alpaca_prompt(record["instruction"], record["input"])
        assert response[-1] == sp.eos_id() and sp.decode(response[:-1]) == record["output"]
    assert "### Input:" in fmts.alpaca_prompt("x", "y") and "### Input:" not in fmts.alpaca_prompt("x")
    run(write_jsonl(tmp_path / "a.jsonl", ALPACA), real_tok, tmp_path / "lines", format="alpaca")
    assert tree(tmp_path / "list")["part-00000/loss_mask.bin"] == tree(tmp_path / "lines")["part-00000/loss_mask.bin"]


@pytest.mark.parametrize("name, records, letters, option", [
    ("medqa", [{"id": "q1", "sent1": "A 45-year-old man has chest pain.", "sent2": "",
                "ending0": "MI", "ending1": "GERD", "ending2": "PE", "ending3": "Costochondritis", "label": 2}],
     ["C"], "C. PE"),
    ("medmcqa", [{"question": "Vitamin deficient in pernicious anemia?", "opa": "B1", "opb": "B12", "opc": "C",
                  "opd": "D", "cop": 1, "id": "m1"}], ["B"], "B. B12"),  # Hugging Face: cop counts from 0
    ("medmcqa", [{"question": "Q1", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 4},
                 {"question": "Q2", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1}],
     ["D", "A"], "D. z"),  # the original release counts from 1: a 4 gives it away
    ("pubmedqa", [{"pubid": 1, "question": "Does aspirin prevent stroke?",
                   "context": {"contexts": ["Background one.", "Results two."], "labels": ["B", "R"]},
                   "final_decision": "maybe"}], ["C"], "C. maybe"),
])
def test_multiple_choice_letter_is_the_response(tmp_path, real_tok, sp, name, records, letters, option):
    run(write_jsonl(tmp_path / "in.jsonl", records), real_tok, tmp_path / "store", format=name)
    store = st.TokenStore(tmp_path / "store")
    for i, letter in enumerate(letters):
        prompt, response = split_by_mask(store, i)
        text = sp.decode(prompt[1:])
        assert text.startswith("Below is a multiple-choice question") and text.endswith("### Answer:\n")
        assert response == sp.encode(text + letter)[len(sp.encode(text)):] + [sp.eos_id()]
        assert sp.decode(response[:-1]) == letter
    assert option in sp.decode(split_by_mask(store, 0)[0][1:])
    if name == "pubmedqa":
        assert "### Context:\nBackground one.\nResults two." in sp.decode(store[0].tolist())


def test_pubmedqa_original_file_and_lmflow(tmp_path, real_tok, sp):
    original = tmp_path / "ori_pqal.json"
    original.write_text(json.dumps({"123": {"QUESTION": "Is X safe?", "CONTEXTS": ["C1."], "final_decision": "yes"},
                                    "456": {"QUESTION": "Is Y safe?", "CONTEXTS": ["C2."], "final_decision": "no"}},
                                   indent=1))
    run(original, real_tok, tmp_path / "pq", format="pubmedqa")
    pq = st.TokenStore(tmp_path / "pq")
    assert [sp.decode(split_by_mask(pq, i)[1][:-1]) for i in range(2)] == ["A", "B"]

    text_only = tmp_path / "t.json"
    text_only.write_text(json.dumps({"type": "text_only", "instances": [{"text": "One."}, {"text": "Two."}]}, indent=2))
    t2t = tmp_path / "t2t.json"
    t2t.write_text(json.dumps({"type": "text2text", "instances": [{"input": "Q: 2+2?\nA:", "output": " 4"}]}))
    run([text_only, t2t], real_tok, tmp_path / "lm", format="lmflow")
    lm = st.TokenStore(tmp_path / "lm")
    assert len(lm) == 3 and lm.loss_mask(0).tolist() == [0] + [1] * (len(lm[0]) - 1)
    prompt, response = split_by_mask(lm, 2)
    assert sp.decode(prompt[1:]) == "Q: 2+2?\nA:" and sp.decode(response[:-1]).strip() == "4"
    with pytest.raises(SpecError, match='field "type" is \'chat\', expected text_only or text2text'):
        run(write_jsonl(tmp_path / "c.jsonl", [{"type": "chat", "instances": []}]), real_tok, tmp_path / "x",
            format="lmflow")


def test_json_list_is_read_incrementally_with_lines():
    import io

    data = b'[\n {"a": 1},\n {"b": "x,]y"}\n,\n{"c": [1,\n2]}\n]\n'
    records = list(readers._json_list(Path("f.json"), data.split(b"\n", 1)[0] + b"\n",
                                   io.BufferedReader(io.BytesIO(data.split(b"\n", 1)[1])), 1, chunk=5))
    assert records == [(2, {"a": 1}), (3, {"b": "x,]y"}), (5, {"c": [1, 2]})]
    broken = b'[{"a": 1},\n{"b": oops}]'
    with pytest.raises(readers.FileError) as e:
        list(readers._json_list(Path("f.json"), broken, io.BufferedReader(io.BytesIO(b"")), 1))
    assert e.value.line == 2


# --- bad input ---


BAD = ['{"text": "fine"}', '{"text": "fine too"}', '{"text": "broken', '{"title": "no text"}', '{"text": 5}',
       '{"text": "last"}']


def test_bad_line_is_file_line_and_exit_2(cli, tmp_path, real_tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD)
    code, stdout, stderr = cli("data", "prepare", str(bad), "--tokenizer", str(real_tok), "--out", str(tmp_path / "s"))
    assert code == 2 and stdout == ""
    assert f"{bad}:3: not valid JSON" in stderr and "--skip-bad-lines" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == [bad], "nothing half-written is left"

    missing = write_jsonl(tmp_path / "missing.jsonl", BAD[:2] + BAD[3:4])
    code, _, stderr = cli("data", "prepare", str(missing), "--tokenizer", str(real_tok), "--out", str(tmp_path / "s"))
    assert code == 2 and f'{missing}:3: missing field "text"; --format text expects {{"text": "..."}}' in stderr


def test_broken_json_list_and_truncated_gzip_exit_2(cli, tmp_path, real_tok):
    broken = tmp_path / "a.json"
    broken.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]')
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in corpus(50)))[:-30])
    for path, fmt, message in ((broken, "alpaca", f"{broken}:3: not valid JSON"), (gz, "text", "cannot be read")):
        code, _, stderr = cli("data", "prepare", str(path), "--format", fmt, "--tokenizer", str(real_tok),
                              "--out", str(tmp_path / "s"), "--skip-bad-lines")
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "s").exists()


def test_skip_bad_lines_counts_and_reports(cli, tmp_path, real_tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", BAD + ['{"text": ""}'])
    code, stdout, stderr = cli("data", "prepare", str(bad), "--tokenizer", str(real_tok), "--out",
                               str(tmp_path / "s"), "--skip-bad-lines", "--json")
    assert code == 0, stderr
    meta = json.loads(stdout)
    assert (meta["documents"], meta["skipped_bad_lines"], meta["skipped_empty"]) == (3, 3, 1)
    assert [line.split(": ")[0] for line in meta["bad_line_examples"]] == [f"{bad}:{n}" for n in (3, 4, 5)]
    assert 'field "text" is a number, expected a string' in meta["bad_line_examples"][2]
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["skipped_bad_lines"] == 3


def test_text_after_a_json_list_is_an_error_at_its_line(cli, tmp_path, tokenizer_dir):
    """A file that starts as a JSON list holds that list: JSON lines appended after it (or a second
    list) are an error naming their line, never dropped; only whitespace may follow the ]."""
    listed = tmp_path / "a.json"
    for tail, line in (('\n\n{"text": "appended"}\n', 5), (' [{"text": "again"}]', 3), ("\n,", 4)):
        listed.write_text('[\n{"text": "one"},\n{"text": "two"}]' + tail)
        for extra in ([], ["--skip-bad-lines"]):
            code, _, err = cli("data", "prepare", str(listed), "--tokenizer", str(tokenizer_dir), "--out",
                               str(tmp_path / "s"), *extra)
            assert code == 2 and f"{listed}:{line}: text after the closing ] of the JSON list" in err, (tail, err)
            assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
    listed.write_text('[{"text": "one"}, {"text": "two"}]  \n\n  \n')
    assert run(listed, tokenizer_dir, tmp_path / "ok")["documents"] == 2
    # read in chunks smaller than the whitespace after the list: still found, at its line
    import io

    data = b'[{"a": 1}]\n   \n    \n  x'
    with pytest.raises(readers.FileError) as e:
        list(readers._json_list(Path("f.json"), data[:11], io.BufferedReader(io.BytesIO(data[11:])), 1, chunk=2))
    assert e.value.line == 4


def test_a_json_list_element_that_is_not_utf8_is_a_bad_line(tmp_path, tokenizer_dir):
    listed = tmp_path / "a.json"
    listed.write_bytes(b'[\n{"text": "one"},\n{"text": "t\xffwo"},\n{"text": "three"}\n]\n')
    with pytest.raises(SpecError, match=r"a\.json:3: not valid UTF-8; pass --skip-bad-lines"):
        run(listed, tokenizer_dir, tmp_path / "s")
    meta = run(listed, tokenizer_dir, tmp_path / "s", skip_bad_lines=True)
    assert meta["documents"] == 2 and meta["bad_line_examples"] == [f"{listed}:3: not valid UTF-8"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# One good record per format, and where a deeply nested value can go in it.
GOOD = {
    "text": {"text": "A fine document."},
    "s2orc": {"corpusid": 1, "externalids": {"pubmedcentral": "PMC1"}, "content": {"text": "A fine paper."}},
    "alpaca": {"instruction": "Say yes.", "input": "", "output": "Yes."},
    "medqa": {"sent1": "Which?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 1},
    "medmcqa": {"question": "Which?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2},
    "pubmedqa": {"question": "Does it?", "context": "It does.", "final_decision": "yes"},
    "lmflow": {"type": "text_only", "instances": [{"text": "A fine instance."}]},
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
}


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_deeply_nested_records_are_bad_lines_in_every_format(cli, tmp_path, tokenizer_dir, fmt):
    """Nesting that would exhaust Python's recursion (to parse it, or to hand it to a worker process)
    is a bad line naming PATH:LINE, skipped with --skip-bad-lines; in a JSON list an element too deep
    to parse ends the list with an error at its line."""
    good = json.dumps(GOOD[fmt])
    chat = ["--chat-template", "chatml"] if fmt == "messages" else []
    lines = tmp_path / f"{fmt}.jsonl"
    for depth in (200, 50_000):  # 200 parses (and is refused); 50,000 is past the recursion limit
        deep = good[:-1] + f', "deep": {nested(depth)}}}'
        lines.write_text("\n".join([good, deep, good]) + "\n")
        base = ("data", "prepare", str(lines), "--tokenizer", str(tokenizer_dir), "--format", fmt, *chat)
        code, _, err = cli(*base, "--out", str(tmp_path / "s"))
        assert code == 2 and f"{lines}:2: nested deeper than 100 levels" in err, err
        assert len(err.strip().splitlines()) == 1
        code, out, err = cli(*base, "--out", str(tmp_path / f"s{depth}"), "--skip-bad-lines", "--json")
        assert code == 0 and json.loads(out)["skipped_bad_lines"] == 1, err
    listed = tmp_path / f"{fmt}.json"
    listed.write_text(f"[\n{good},\n{good[:-1]}, \"deep\": {nested(200)}}}\n]\n")
    code, out, err = cli("data", "prepare", str(listed), "--tokenizer", str(tokenizer_dir), "--format", fmt, *chat,
                         "--out", str(tmp_path / "l"), "--skip-bad-lines", "--json")
    assert code == 0 and json.loads(out)["bad_line_examples"] == [f"{listed}:3: nested deeper than 100 levels"], err
    listed.write_text(f"[\n{good},\n{nested(50_000)}\n]\n")
    code, _, err = cli("data", "prepare", str(listed), "--tokenizer", str(tokenizer_dir), "--format", fmt, *chat,
                       "--out", str(tmp_path / "m"), "--skip-bad-lines")
    assert code == 2 and f"{listed}:3: a record nests deeper than 100 levels" in err, err


def test_a_deep_record_parsed_by_the_reader_reaches_no_worker(tmp_path, tokenizer_dir):
    """JSON lists and whole-file documents are parsed in the main process and copied to the workers:
    a record pickle cannot copy (about 500 levels) is a bad line before that, with --workers 2 too."""
    listed = tmp_path / "a.json"
    listed.write_text(f'[{{"text": "one"}}, {{"text": "two", "deep": {nested(600)}}}]')
    meta = run(listed, tokenizer_dir, tmp_path / "s", workers=2, skip_bad_lines=True)
    assert meta["documents"] == 1 and meta["bad_line_examples"] == [f"{listed}:1: nested deeper than 100 levels"]
    document = tmp_path / "lmflow.json"
    document.write_text(json.dumps({"type": "text_only", "instances": [{"text": "fine"}, {"text": "x", "d": "DEEP"}]},
                                   indent=1).replace('"DEEP"', nested(600)))
    meta = run(document, tokenizer_dir, tmp_path / "l", format="lmflow", skip_bad_lines=True)
    assert meta["documents"] == 1 and meta["skipped_bad_lines"] == 1
    document.write_text("{\n" + f'"type": "text_only", "instances": {nested(50_000)}' + "\n}")
    with pytest.raises(SpecError, match=r"lmflow\.json:1: the JSON document nests deeper than 100 levels"):
        run(document, tokenizer_dir, tmp_path / "m", format="lmflow")


def test_an_integer_too_long_to_convert_is_a_bad_line(tmp_path, tokenizer_dir):
    lines = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, '{"text": "x", "id": ' + "7" * 5000 + "}"])
    with pytest.raises(SpecError, match=r"a\.jsonl:2: not valid JSON \(Exceeds the limit"):
        run(lines, tokenizer_dir, tmp_path / "s")
    listed = tmp_path / "a.json"
    listed.write_text('[{"text": "fine"},\n{"text": "x", "id": ' + "7" * 5000 + "}]")
    with pytest.raises(SpecError, match=r"a\.json:2: not valid JSON \(Exceeds the limit"):
        run(listed, tokenizer_dir, tmp_path / "s", skip_bad_lines=True)


def ids_held_out(fraction: float, held: bool, n: int) -> list[dict]:
    """n text records whose ids the eval split takes (held) or leaves (not held) at this fraction."""
    ids = (f"doc-{i}" for i in range(10_000) if held_out(f"id:doc-{i}", fraction) == held)
    return [{"id": doc_id, "text": f"Document {doc_id}."} for doc_id, _ in zip(ids, range(n))]


def test_an_eval_split_taking_every_document_is_refused_and_an_empty_one_said(cli, tmp_path, tokenizer_dir):
    all_held = write_jsonl(tmp_path / "held.jsonl", ids_held_out(0.5, True, 3))
    code, out, err = cli("data", "prepare", str(all_held), "--tokenizer", str(tokenizer_dir), "--out",
                         str(tmp_path / "s"), "--eval-fraction", "0.5")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert ("--eval-fraction 0.5: all 3 documents went to the eval split (by a hash of each document's id or "
            "text), none is left to train on; lower --eval-fraction or give more documents") in err
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == [all_held]
    none_held = write_jsonl(tmp_path / "kept.jsonl", ids_held_out(0.1, False, 4))
    code, out, err = cli("data", "prepare", str(none_held), "--tokenizer", str(tokenizer_dir), "--out",
                         str(tmp_path / "s"), "--eval-fraction", "0.1")
    assert code == 0 and "eval split: 0 documents" in out
    assert ("warning: --eval-fraction 0.1 held out none of the 4 documents (the split is by a hash of each "
            "document's id or text): the eval split is empty") in err


@pytest.mark.parametrize("args, message", [
    (["--format", "csv"], "--format 'csv' is not known; choose one of text, s2orc"),
    (["--workers", "0"], "--workers 0: must be 1 to"),
    (["--workers", "100000"], "--workers 100000: must be 1 to"),
    (["--eval-fraction", "1.5"], "--eval-fraction 1.5"),
    (["--eval-fraction", "0.9"], "--eval-fraction 0.9: must be 0 to 0.5"),
    (["--eval-fraction", "nan"], "--eval-fraction nan: must be 0 to 0.5"),
    (["--shards", "100000000", "--cluster", "local"], "--shards 100000000: must be 1 to 10,000"),
    (["--shards", "2", "--cluster", "local", "--cpus-per-task", "100000"], "--cpus-per-task 100000: must be 1 to 1024"),
    (["--shards", "2", "--cluster", "slurm", "--mem", "99999999T"], "--mem 99999999T: must be at most 64T"),
    (["--cluster", "local", "--no-wait"], "--cluster, --no-wait: only with --shards N"),
    (["--shards", "0", "--cluster", "local"], "--shards 0: must be 1 to 10,000"),
    (["--shards", "2", "--cluster", "debug"], "--cluster 'debug': shards run on slurm or local"),
    (["--shards", "2", "--cluster", "slurm", "--time", "1:99:00"], "--time '1:99:00' is malformed"),
])
def test_bad_flags_exit_2(cli, tmp_path, real_tok, args, message):
    f = write_jsonl(tmp_path / "in.jsonl", corpus(2))
    code, _, stderr = cli("data", "prepare", str(f), "--tokenizer", str(real_tok), "--out", str(tmp_path / "s"), *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_no_tokenizer_and_not_a_store_exit_2(cli, tmp_path):
    f = write_jsonl(tmp_path / "in.jsonl", corpus(2))
    code, _, stderr = cli("data", "prepare", str(f), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "s"))
    assert code == 2 and "expected a model directory with tokenizer.model" in stderr
    code, _, stderr = cli("data", "inspect", str(tmp_path))
    assert code == 2 and "is not a token store: no meta.json" in stderr


# --- --force replaces only what llamajobs wrote ---


def test_force_replaces_a_store_and_refuses_anything_else(tmp_path, real_tok):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    f = write_jsonl(corpus_dir / "in.jsonl", corpus(5))
    for out in (corpus_dir, tmp_path):  # the directory holding the corpus, or one above it
        with pytest.raises(SpecError, match=f"--out {out} holds the input"):
            run(f, real_tok, out, force=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(SpecError, match=f"--out {notes} is not a token store"):
        run(f, real_tok, notes, force=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SpecError, match="is not a directory llamajobs wrote"):
        run(f, real_tok, tmp_path / "a-file", force=True)
    (tmp_path / "tok").mkdir()
    tok = Path(shutil.copy(real_tok, tmp_path / "tok" / "tokenizer.model"))
    with pytest.raises(SpecError, match="holds the input"):  # the tokenizer is an input too
        run(f, tok, tmp_path / "tok", force=True)
    assert (notes / "thesis.tex").read_text() == "years of work" and f.exists()
    store = tmp_path / "store"
    run(f, real_tok, store)
    run(f, real_tok, store, force=True)
    (tmp_path / "empty").mkdir()
    run(f, real_tok, tmp_path / "empty", force=True)  # an empty directory holds nothing to lose
    assert st.is_store(store) and st.is_store(tmp_path / "empty")


def test_force_refuses_a_work_dir_that_is_not_a_sharded_preparation(cli, tmp_path, real_tok):
    f = write_jsonl(tmp_path / "in.jsonl", corpus(5))
    (tmp_path / "s.parts").mkdir()
    (tmp_path / "s.parts" / "mine.txt").write_text("not llamajobs'")
    code, _, stderr = cli("data", "prepare", str(f), "--tokenizer", str(real_tok), "--out", str(tmp_path / "s"),
                          "--shards", "2", "--cluster", "local", "--force")
    assert code == 2 and "s.parts exists and holds no preparation of llamajobs" in stderr
    assert (tmp_path / "s.parts" / "mine.txt").exists()


# --- atomic writing ---


def test_failure_midway_leaves_no_store_and_keeps_the_old_one(tmp_path, real_tok, monkeypatch):
    good = write_jsonl(tmp_path / "in.jsonl", corpus(40))
    out = tmp_path / "store"
    run(good, real_tok, out)
    before = tree(out)
    with pytest.raises(SpecError, match="already exists"):
        run(good, real_tok, out)
    with pytest.raises(SpecError, match=":41: not valid JSON"):  # fails after the first chunks are written
        run(write_jsonl(tmp_path / "bad.jsonl", [json.dumps(r) for r in corpus(40)] + ["{"]), real_tok, out,
            force=True, chunk_bytes=1000)
    assert tree(out) == before

    calls = []

    def fail_later(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args, **kw)

    original = st.PartWriter.write
    monkeypatch.setattr(st.PartWriter, "write", fail_later)
    with pytest.raises(OSError, match="disk full"):
        run(good, real_tok, tmp_path / "other", chunk_bytes=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "in.jsonl", "store"]
    monkeypatch.undo()
    run(good, real_tok, out, force=True)
    assert tree(out) == before, "a replaced store is the same bytes for the same input"


def test_killed_prepare_leaves_nothing_that_looks_like_a_store(tmp_path, real_tok):
    """SIGKILL in the middle of a prepare: only DIR.tmp-<pid> remains, without meta.json."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "llamajobs", "data", "prepare", str(fifo), "--tokenizer",
                             str(real_tok), "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:  # open for writing once the reader is there (never block on a dead reader)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
    os.set_blocking(fd, True)
    try:
        with open(fd, "w") as f:
            while not list(tmp_path.glob("store.tmp-*")):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                f.write(json.dumps({"text": "a document " * 200}) * 1 + "\n")
                f.flush()
                time.sleep(0.01)
            for _ in range(200):  # more than a chunk: some of it written
                f.write(json.dumps({"text": "more text " * 200}) + "\n")
            f.flush()
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    except BrokenPipeError:
        pass
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    (tmp,) = tmp_path.glob("store.tmp-*")
    assert not (tmp / "meta.json").exists()
    with pytest.raises(SpecError, match=r"not a token store: no meta.json \(an unfinished prepare left store.tmp-"):
        st.TokenStore(out)


# --- workers ---


def test_two_workers_give_a_byte_identical_store(tmp_path, real_tok):
    docs = write_jsonl(tmp_path / "in.jsonl", corpus(300))
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{**r, "instruction": f"{i}. {r['instruction']}"}
                                                for i, r in enumerate(ALPACA * 50)])
    for name, f, fmt in (("text", docs, "text"), ("alpaca", alpaca, "alpaca")):
        one = run(f, real_tok, tmp_path / f"{name}1", format=fmt, eval_fraction=0.1, chunk_bytes=4096)
        two = run(f, real_tok, tmp_path / f"{name}2", format=fmt, eval_fraction=0.1, chunk_bytes=4096, workers=2)
        assert one == two and one["eval"]["documents"] > 0
        assert tree(tmp_path / f"{name}1") == tree(tmp_path / f"{name}2")


# --- fast tokenizers (tokenizer.json) through the `tokenizers` library ---


# Every family's special-token strings, and the other families', inside documents' text: all must stay text.
SPECIAL_STRINGS = "a </s> b <s> c <|endoftext|> d <|im_start|>user e <|begin_of_text|> f <|eot_id|> [INST] g"


@pytest.fixture(scope="module")
def fast_toks(tmp_path_factory) -> dict[str, Path]:
    """Real byte-level BPE tokenizer.json files trained here, with each family's special tokens: Mistral
    (BOS <s>), Llama 3 (BOS <|begin_of_text|>) and Qwen 2 (no BOS: documents start with its EOS)."""
    from tests.families import train_fast_tokenizer

    root = tmp_path_factory.mktemp("fast")
    return {f: (train_fast_tokenizer(f, root / f), root / f)[1] for f in ("mistral", "llama", "qwen2")}


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2"])
def test_fast_tokenizer_ids_are_transformers_and_special_strings_stay_text(tmp_path, fast_toks, family):
    """The store holds what transformers' tokenizer gives (split_special_tokens=True), framed by the one
    BOS (Qwen: EOS) and EOS the prepare adds; a special token's string in a document or an instruction
    record is text, in the plain text and the prompt/response alike, with --workers 1 and 2."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(fast_toks[family])
    start, eos = hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id, hf.eos_token_id
    specials = set(hf.all_special_ids)
    texts = [SPECIAL_STRINGS, *(t[:300] for t in list(read_texts(SAMPLE_CORPUS))[:5]), "x" + SPECIAL_STRINGS[::-1]]
    assert specials & set(hf(SPECIAL_STRINGS, add_special_tokens=False)["input_ids"]), \
        "without split_special_tokens the strings would be control tokens: the test would show nothing"
    records = [{"instruction": f"Q{i}: {t[:40]} </s>", "input": "<|endoftext|>", "output": t[40:] or "A <s>"}
               for i, t in enumerate(texts)]
    docs, alpaca = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), write_jsonl(tmp_path / "a.jsonl", records)
    for workers in (1, 2) if family == "qwen2" else (1,):
        run(docs, fast_toks[family], tmp_path / f"t{workers}", workers=workers, chunk_bytes=256)
        store = st.TokenStore(tmp_path / f"t{workers}")
        for doc, text in zip(store, texts):
            assert doc.tolist() == [start, *hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], eos]
            assert not specials & set(doc[1:-1].tolist()), "no control token inside a document"
        run(alpaca, fast_toks[family], tmp_path / f"a{workers}", workers=workers, format="alpaca", chunk_bytes=256)
        instruct = st.TokenStore(tmp_path / f"a{workers}")
        for i, record in enumerate(records):
            (example,) = fmts.get_format("alpaca").examples(record, None)
            whole = hf(example.prompt + example.response, add_special_tokens=False, split_special_tokens=True)
            prompt_ids, response_ids = split_by_mask(instruct, i)
            assert prompt_ids + response_ids == [start, *whole["input_ids"], eos]
            assert len(prompt_ids) > 1 and not specials & set((prompt_ids + response_ids)[1:-1])
    assert store.fingerprint == st.fingerprint_of(hf) and store.meta["tokenizer"]["bos_id"] == start


def test_a_worker_imports_neither_transformers_nor_torch(tmp_path, fast_toks):
    """What a spawned worker runs (_init_worker, then _encode_in_worker), in a fresh interpreter."""
    import pickle

    from llamajobs.data.encoder import Encoder
    from llamajobs.data.prepare import Chunk

    encoder = Encoder(fast_toks["qwen2"])
    args = (encoder.codec, "text", [None], 0.0, None)
    chunk = Chunk(0, [(1, json.dumps({"text": SPECIAL_STRINGS}).encode())], 0)
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((args, chunk)))
    code = ("import pickle, sys; from llamajobs.data import prepare as p; "
            f"args, chunk = pickle.loads(open({str(tmp_path / 'job.pkl')!r}, 'rb').read()); p._init_worker(*args); "
            "enc = p._encode_in_worker(chunk); "
            "print(enc.tokens.tolist(), sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}).stdout
    assert out.split("] ")[1].strip() == "[]", out
    assert out.split("] ")[0] + "]" == str([encoder.bos_id, *encoder.encode([SPECIAL_STRINGS])[0], encoder.eos_id])


def test_sentencepiece_keeps_special_strings_as_text(tmp_path, real_tok, sp):
    """sentencepiece never matches its control pieces (<s>, </s>) in text: text and instruct formats."""
    run(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say </s> <s>", "input": "", "output": "ok </s>"}]),
        real_tok, tmp_path / "s", format="alpaca")
    doc = st.TokenStore(tmp_path / "s")[0].tolist()
    assert doc[0] == sp.bos_id() and doc[-1] == sp.eos_id() and doc.count(sp.eos_id()) == doc.count(sp.bos_id()) == 1


# --- the CLI ---


def test_cli_prepare_and_inspect(cli, tmp_path, real_tok):
    f = write_jsonl(tmp_path / "in.jsonl.gz", corpus(5), gz=True)
    out = tmp_path / "store"
    code, stdout, stderr = cli("data", "prepare", str(f), "--tokenizer", str(real_tok), "--out", str(out))
    assert code == 0, stderr
    assert "5 documents" in stdout and "uint16" in stdout
    code, stdout, stderr = cli("data", "inspect", str(out), "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert (info["documents"], info["dtype"], info["fingerprint"]) == (5, "uint16", st.TokenStore(out).fingerprint)
    assert info["tokens"] == st.TokenStore(out).num_tokens
    assert info["sample"]["text"].startswith(corpus(5)[0]["text"][:40])
    code, stdout, _ = cli("data", "inspect", str(out), "--document", "1")
    assert code == 0 and "fingerprint" in stdout and corpus(5)[1]["text"][:30] in stdout


def test_inspect_counts_negative_documents_from_the_end_and_refuses_a_smaller_vocabulary(cli, tmp_path, real_tok,
                                                                                           tokenizer_dir):
    run(write_jsonl(tmp_path / "in.jsonl", corpus(3)), real_tok, tmp_path / "s")
    for given, shown in (("-1", 2), ("-2", 1), ("-3", 0), ("2", 2)):
        code, out, err = cli("data", "inspect", str(tmp_path / "s"), "--document", given, "--json")
        assert code == 0 and json.loads(out)["sample"]["document"] == shown, err
        assert json.loads(out)["sample"]["text"].startswith(corpus(3)[shown]["text"][:30])
    for given in ("-4", "3", "-1000000000000"):
        code, _, err = cli("data", "inspect", str(tmp_path / "s"), "--document", given)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (f"--document {given}: the store has 3 documents, so --document takes 0 to 2 (or -3 to -1, counting "
                f"from the end)") in err
    code, _, err = cli("data", "inspect", str(tmp_path / "s"), "--tokenizer", str(tokenizer_dir))
    top = st.TokenStore(tmp_path / "s").meta["max_token_id"]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    assert (f"--tokenizer {tokenizer_dir} has {TINY_VOCAB} ids, but the store holds token id {top:,} (it was made "
            f"with a vocabulary of 32,000); pass the tokenizer the store was made with ({real_tok})") in err


def test_inspect_shows_prompt_and_response(tmp_path, real_tok):
    run(write_jsonl(tmp_path / "a.jsonl", ALPACA), real_tok, tmp_path / "s", format="alpaca")
    sample = describe(tmp_path / "s", document=1)["sample"]
    assert sample["prompt"].endswith("### Response:\n") and sample["response"] == "It blocks COX-1."


# --- samplers over a store ---


def test_store_is_window_samplers_docs(tmp_path, tokenizer_dir):
    """WindowSampler over TokenStore draws the same batches as over the in-memory documents."""
    from transformers import LlamaTokenizer

    from llamajobs.data.sampler import WindowSampler, tokenize_documents

    run(write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in read_texts(SAMPLE_CORPUS)]), tokenizer_dir,
        tmp_path / "s")
    hf = LlamaTokenizer.from_pretrained(tokenizer_dir)
    store = st.open_documents(tmp_path / "s", hf, model_vocab_size=TINY_VOCAB)
    kw = dict(seq_len=64, global_batch=8, micro_batch=2, rank=1, world_size=2, seed=3, pad_id=hf.eos_token_id)
    a, b = WindowSampler(store, **kw), WindowSampler(tokenize_documents(read_texts(SAMPLE_CORPUS), hf), **kw)
    for _ in range(25):  # past the end of the first epoch
        for (xa, ya), (xb, yb) in zip(next(a), next(b)):
            assert xa.equal(xb) and ya.equal(yb)
    assert a.state_dict() == b.state_dict()


def test_packed_instruction_rows(tmp_path, real_tok, sp):
    from llamajobs.data.instruct import PackedSampler, steps_per_epoch
    from llamajobs.data.sampler import IGNORE_INDEX

    records = [{"instruction": f"Question {i}?", "input": "x" * (i % 5), "output": f"Answer {i}. " * (1 + i % 4)}
               for i in range(40)]
    run(write_jsonl(tmp_path / "a.jsonl", records), real_tok, tmp_path / "s", format="alpaca")
    store = st.TokenStore(tmp_path / "s")
    kw = dict(seq_len=256, global_batch=4, micro_batch=2, world_size=1, seed=0, pad_id=sp.eos_id())
    sampler = PackedSampler(store, rank=0, **kw)
    rows = sampler.rows_in_epoch(0)
    assert rows < len(store) and steps_per_epoch(sampler) == rows // 4
    seen = []
    for row in range(rows):
        inputs, labels, positions = sampler.example(row)
        # Each document's positions restart at 0 at its BOS (the padding after the last one's too).
        assert (positions[inputs == sp.bos_id()] == 0).all() and positions[0] == 0
        assert ((np.diff(positions) == 1) | (positions[1:] == 0)).all()
        assert (positions == 0).sum() - (inputs == sp.bos_id()).sum() in (0, 1)
        assert (inputs == sp.bos_id()).sum() == len(sampler.packing(0)[0][sampler.packing(0)[1][row]:
                                                                          sampler.packing(0)[1][row + 1]])
        targets = labels[labels != IGNORE_INDEX]
        assert len(targets) and sp.bos_id() not in targets.tolist()
        assert (targets == sp.eos_id()).sum() == (inputs == sp.bos_id()).sum(), "each document's EOS is a target"
        text = sp.decode([t for t in targets.tolist() if t != sp.eos_id()])
        assert "Answer" in text and "Question" not in text and "Below is" not in text
        seen += sampler.packing(0)[0][sampler.packing(0)[1][row]:sampler.packing(0)[1][row + 1]].tolist()
    assert sorted(seen) == list(range(len(store))), "every document once per epoch"
    for _ in range(rows // 4 + 1):  # into epoch 1
        next(sampler)
    resumed = PackedSampler(store, rank=0, **kw)
    resumed.load_state_dict(sampler.state_dict())
    for (xa, ya, pa), (xb, yb, pb) in zip(next(sampler), next(resumed)):
        assert xa.equal(xb) and ya.equal(yb) and pa.equal(pb)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b'{"model": 3}', b"[1, 2"])
def test_a_damaged_tokenizer_json_is_one_line(cli, tmp_path, content):
    f = write_jsonl(tmp_path / "in.jsonl", corpus(2))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(content)
    code, _, stderr = cli("data", "prepare", str(f), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "s"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert "its tokenizer cannot be loaded" in stderr


def test_wrong_bytes_are_one_line_naming_the_file(cli, tmp_path):
    (tmp_path / "st").mkdir()
    for meta in (b"\xff\xfe", b"[1]"):
        (tmp_path / "st" / "meta.json").write_bytes(meta)
        code, _, stderr = cli("data", "inspect", str(tmp_path / "st"))
        assert code == 2 and f"{tmp_path / 'st' / 'meta.json'} is not a llamajobs token store" in stderr
    (tmp_path / "t.txt").write_bytes(b"fine\nx\xffy\n")
    code, _, stderr = cli("tokenizer", "train", str(tmp_path / "t.txt"), "--vocab-size", "300", "--out",
                          str(tmp_path / "tk"))
    assert code == 2 and f"{tmp_path / 't.txt'}: not UTF-8 text" in stderr and len(stderr.splitlines()) == 1
