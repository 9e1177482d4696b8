"""Property: whatever values the spec's fields and the site keys get (random text with control
characters, quotes and `$()`, numbers, NaN, huge values, wrong types), building them gives either a
valid spec or one SpecError line, never another exception; and nothing rendered from a valid one
holds a control character that could change what the scripts do.

And the data readers: random records (near-valid ones of each format, with wrong types, deep
nesting, huge numbers, bytes that are not UTF-8) and random bytes, in each container (JSON lines, a
JSON list, a whole-file document, csv, tsv), give `data prepare` a store, or exit 2 with one line
naming FILE:LINE, never an internal error."""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llamajobs import render, spec
from llamajobs import site as site_mod
from llamajobs.errors import SpecError

SHELLISH = st.sampled_from(["$(touch PWNED)", "`id`", "'", '"', "\\", ";", "&&", "\n", "\r", "\x00", "\x1b", "\t",
                            "\x85", " ", "{gpus}", "{", "1:00:00", "2.5B", "nan", "-1", "0", "all", "gpu"])
TEXT = st.one_of(st.text(max_size=12), st.lists(SHELLISH, max_size=4).map("".join),
                 st.tuples(st.text(max_size=4), SHELLISH, st.text(max_size=4)).map("".join))
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-4, max_value=10**30), st.floats(allow_nan=True),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, 1e308, 0, -1, 1, 2, 8]))
SCALARS = st.one_of(TEXT, NUMBERS, st.booleans(), st.none(), st.binary(max_size=4))
HOSTILE = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=2))
# Values a field might well take, so that many examples are valid and get rendered (with the hostile
# ones beside them: "; touch PWNED" is printable text).
PLAUSIBLE = st.one_of(st.from_regex(r"[A-Za-z0-9_.:/{}$ ;'\"-]{1,10}", fullmatch=True), st.integers(1, 8),
                      st.sampled_from([True, False, None, "fsdp", "lora", "7b", "1:00:00", "8G", "q_proj"]))
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, HOSTILE)

SPEC_KEYS = st.sampled_from(sorted(set(spec.FIELDS) - {"evaluation"}))
SITE_KEYS = st.sampled_from(sorted(site_mod.SITE_KEYS))
# Around a plausible base, so that a good share of examples is valid and gets rendered.
BASE = {"cluster": "slurm", "procs_per_node": 1, "global_batch": 4, "micro_batch": 4}


def one_line(error: SpecError) -> bool:
    text = str(error)
    return bool(text) and not any(unicodedata.category(c) == "Cc" for c in text)


def assert_no_control_characters(folder: Path) -> None:
    for path in folder.iterdir():
        text = path.read_text()
        bad = {c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t"}  # (tabs: setup's indent)
        assert not bad, f"{path.name} holds {bad}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_values=st.dictionaries(SPEC_KEYS, VALUES, max_size=2),
       site_values=st.dictionaries(SITE_KEYS, VALUES, max_size=2))
def test_random_values_give_a_spec_or_one_line(spec_values, site_values):
    try:
        site, defaults = site_mod.from_mapping(dict(site_values))
        built = spec.build({**BASE, **spec_values}, site=defaults)
    except SpecError as e:
        assert one_line(e), repr(str(e))
        event("refused")
        return
    event("valid: rendered")
    with tempfile.TemporaryDirectory() as folder:
        try:
            render.render(built, site, Path(folder) / "run")
        except SpecError as e:  # (a site python or container may still be refused by render)
            assert one_line(e)
            return
        assert_no_control_characters(Path(folder) / "run")
    assert spec.JobSpec.from_json(built.to_json()) == built  # and spec.json reads back as it was written


# --- the data readers ---

# One valid record per format: random values replace some of its fields, so that a good share of the
# examples gets through to the tokenizer and the store.
GOOD = {
    "text": {"text": "A fine document.", "id": "d1"},
    "s2orc": {"corpusid": 1, "externalids": {"pubmedcentral": "PMC1"}, "content": {"text": "A fine paper."}},
    "alpaca": {"instruction": "Say yes.", "input": "", "output": "Yes."},
    "medqa": {"sent1": "Which?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 1},
    "medmcqa": {"question": "Which?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2},
    "pubmedqa": {"question": "Does it?", "context": {"contexts": ["It does."]}, "final_decision": "yes"},
    "lmflow": {"type": "text_only", "instances": [{"text": "A fine instance."}]},
}
EXTRA_KEYS = ["id", "sent2", "ending4", "QUESTION", "CONTEXTS", "pubid", "text", "input", "output", "x"]
# Raw JSON spliced in where these strings stand: nesting past any recursion limit, an integer past
# Python's 4300-digit conversion limit.
RAW = {"@deep150@": "[" * 150 + "]" * 150, "@deep5000@": "[" * 5000 + "]" * 5000, "@digits@": "7" * 5000}
LEAF = st.one_of(st.text(max_size=8), st.sampled_from(["", " ", "NA", "NULL", "42", "A", "E", "0", "4", "yes",
                                                       "maybe", "text_only", "text2text", *RAW]),
                 st.integers(-3, 12), st.integers(), st.floats(), st.booleans(), st.none())
JSON_VALUES = st.recursive(LEAF, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
CONTAINERS = ["jsonl", "json list", "document", "csv", "tsv"]
ERROR = re.compile(r"^Error: (?:(?P<path>.+?):(?P<line>\d+): .+|INPUT .+: no documents .+|--eval-fraction .+)$")


def record_text(record: dict) -> str:
    text = json.dumps(record)
    for mark, raw in RAW.items():
        text = text.replace(json.dumps(mark), raw)
    return text


def cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def container_bytes(container: str, fmt: str, records: list[dict], junk: bytes) -> bytes:
    """The records in a container; junk (random bytes) replaces a line or follows the data."""
    if container == "jsonl":
        lines = [record_text(r).encode() for r in records]
        return b"\n".join(lines[:1] + [junk.replace(b"\n", b" ")] + lines[1:]) + b"\n"
    if container == "json list":
        return ("[\n" + ",\n".join(map(record_text, records)) + "\n]").encode() + junk
    if container == "document":  # LMFlow's {"type", "instances"}, PubMedQA's {pmid: record}, pretty-printed
        if fmt == "lmflow":
            body = ",\n".join(record_text(i) for r in records for i in (r.get("instances") or [r]))
            return f'{{\n "type": {json.dumps(records[0].get("type"))},\n "instances": [\n{body}\n]\n}}'.encode()
        return ("{\n" + ",\n".join(f'"{k}": {record_text(r)}' for k, r in enumerate(records)) + "\n}").encode()
    columns = sorted({k for r in records for k in r})
    text = io.StringIO()
    writer = csv.writer(text, delimiter="\t" if container == "tsv" else ",")
    writer.writerow(columns)
    writer.writerows([cell(r.get(c, "")) for c in columns] for r in records)
    return text.getvalue().encode("utf-8", "surrogatepass") + junk


def assert_a_store_or_one_line(cli, tok: Path, path: Path, fmt: str, *flags: str) -> None:
    out = path.parent / "store"
    code, _, err = cli("data", "prepare", str(path), "--tokenizer", str(tok), "--out", str(out), "--format", fmt,
                       *flags)
    if code == 0:
        assert (out / "meta.json").is_file()
        event("a store")
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    m = ERROR.match(lines[0])
    assert m, lines[0]
    assert m["path"] in (None, str(path)), lines[0]
    event("one FILE:LINE line" if m["path"] else "no documents" if "no documents" in lines[0] else "no training split")


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(GOOD)), container=st.sampled_from(CONTAINERS),
       changes=st.lists(st.dictionaries(st.sampled_from(EXTRA_KEYS + [k for g in GOOD.values() for k in g]),
                                        JSON_VALUES, max_size=3), min_size=1, max_size=3),
       junk=st.one_of(st.just(b""), st.binary(max_size=12), st.sampled_from([b"\xff\xfe", b"]", b'\n{"text": "x"}'])),
       skip=st.booleans(), eval_fraction=st.sampled_from(["0", "0.1", "0.5"]))
def test_random_records_give_a_store_or_one_file_line(cli, tmp_path, tokenizer_dir, fmt, container, changes, junk,
                                                      skip, eval_fraction):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        records = [{**GOOD[fmt], **change} for change in changes]
        suffix = {"csv": ".csv", "tsv": ".tsv"}.get(container, ".json")
        path = Path(folder) / f"in{suffix}"
        path.write_bytes(container_bytes(container, fmt, records, junk))
        flags = ["--eval-fraction", eval_fraction] + (["--skip-bad-lines"] if skip else [])
        assert_a_store_or_one_line(cli, tokenizer_dir, path, fmt, *flags)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(GOOD)), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]),
       data=st.one_of(st.binary(max_size=64),
                      st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b",", b'"', b"\n", b"\r", b"\x00", b"\xff",
                                                b'"text"', b":", b"1", b"\t", b"[[[[", b"]]]]"]), max_size=24)
                      .map(b"".join)),
       skip=st.booleans())
def test_random_bytes_give_a_store_or_one_file_line(cli, tmp_path, tokenizer_dir, fmt, suffix, data, skip):
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        path = Path(folder) / f"in{suffix}"
        path.write_bytes(data)
        assert_a_store_or_one_line(cli, tokenizer_dir, path, fmt, *(["--skip-bad-lines"] if skip else []))
