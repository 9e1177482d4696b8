"""Inputs through the Hugging Face `datasets` library: local parquet, arrow and csv files and
save_to_disk folders give the same store as the JSON lines of the same records; bad records are
PATH:ROW errors; nothing reaches the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from llamajobs.data import store as st  # noqa: E402
from llamajobs.data.prepare import PrepareConfig, prepare  # noqa: E402
from tests.test_chat import CONVERSATIONS  # noqa: E402

ALPACA = [{"instruction": f"Name number {i}.", "input": "" if i % 2 else f"context {i}", "output": f"It is {i}."}
          for i in range(30)]
CHATS = [dict(c, id=f"{c['id']}-{i}") for i in range(10) for c in CONVERSATIONS]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def store_of(inputs, tok, out, **kw) -> dict:
    prepare(PrepareConfig(inputs=tuple(inputs), tokenizer=tok, out=out, **kw))
    return st.content_digest(out)


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_parquet_arrow_csv_and_saved_folders_equal_json_lines(tmp_path, tokenizer_dir):
    expected = store_of([jsonl(tmp_path / "a.jsonl", ALPACA)], tokenizer_dir, tmp_path / "s0", format="alpaca",
                        eval_fraction=0.2)
    table = datasets.Dataset.from_list(ALPACA)
    table.to_parquet(tmp_path / "a.parquet")
    table.to_csv(tmp_path / "a.csv", index=False)
    table.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for i, given in enumerate([tmp_path / "a.parquet", tmp_path / "a.csv", tmp_path / "saved", arrow]):
        got = store_of([given], tokenizer_dir, tmp_path / f"s{i + 1}", format="alpaca", eval_fraction=0.2)
        assert got == expected, given


def test_nested_chat_records_in_parquet_and_a_directory_of_them(tmp_path, tokenizer_dir):
    expected = store_of([jsonl(tmp_path / "c.jsonl", CHATS)], tokenizer_dir, tmp_path / "s0", format="messages",
                        chat_template="chatml")
    parts = tmp_path / "parts"
    parts.mkdir()
    datasets.Dataset.from_list(CHATS[:7]).to_parquet(parts / "0.parquet")
    datasets.Dataset.from_list(CHATS[7:]).to_parquet(parts / "1.parquet")
    assert store_of([parts], tokenizer_dir, tmp_path / "s1", format="messages", chat_template="chatml") == expected
    datasets.Dataset.from_list(CHATS).save_to_disk(tmp_path / "saved")
    assert store_of([tmp_path / "saved"], tokenizer_dir, tmp_path / "s2", format="messages",
                    chat_template="chatml") == expected


def test_bad_rows_name_the_file_and_row(cli, tmp_path, tokenizer_dir):
    rows = [dict(r) for r in ALPACA[:5]]
    rows[2]["output"] = None
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "bad.parquet")
    code, _, err = cli("data", "prepare", str(tmp_path / "bad.parquet"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca")
    assert code == 2 and f"{tmp_path / 'bad.parquet'}:3: missing field \"output\"" in err, err
    code, _, err = cli("data", "prepare", str(tmp_path / "bad.parquet"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca", "--skip-bad-lines", "--json")
    assert code == 0 and json.loads(_)["skipped_bad_lines"] == 1


def test_a_saved_dataset_dict_without_a_train_split_and_a_damaged_file_are_one_line(cli, tmp_path, tokenizer_dir):
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(ALPACA)}
                         ).save_to_disk(tmp_path / "dd")
    code, _, err = cli("data", "prepare", str(tmp_path / "dd"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca")
    assert code == 2 and "a saved DatasetDict with splits validation, test and no train split" in err, err
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    code, _, err = cli("data", "prepare", str(tmp_path / "x.parquet"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca")
    assert code == 2 and "x.parquet" in err and len(err.strip().splitlines()) == 1, err


def test_saved_datasets_inside_a_directory_are_read_as_units(tmp_path, tokenizer_dir):
    """A DatasetDict in a directory INPUT is its train split (the test split is not trained on and
    no metadata file is read as a record); a saved Dataset in it is its rows."""
    train, test, more = ALPACA[:10], ALPACA[10:20], ALPACA[20:]
    corpus = tmp_path / "corpus"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
                         ).save_to_disk(corpus / "a_dict")
    datasets.Dataset.from_list(more).save_to_disk(corpus / "b_one")
    jsonl(corpus / "c.jsonl", ALPACA[:3])
    expected = store_of([jsonl(tmp_path / "all.jsonl", train + more + ALPACA[:3])], tokenizer_dir, tmp_path / "s0",
                        format="alpaca")
    assert store_of([corpus], tokenizer_dir, tmp_path / "s1", format="alpaca") == expected
    # given itself, a DatasetDict is its train split too
    assert store_of([corpus / "a_dict"], tokenizer_dir, tmp_path / "s2", format="alpaca") == store_of(
        [jsonl(tmp_path / "train.jsonl", train)], tokenizer_dir, tmp_path / "s3", format="alpaca")


# Every value a csv cell might hold that pandas would have read as something else.
TEXT_CELLS = [{"id": str(i), "instruction": f"Say {word}.", "input": word, "output": word}
              for i, word in enumerate(["42", "NA", "NULL", "None", "nan", "N/A", "#N/A", "1.0", "007", "True",
                                        "-inf", "null", "1e5"] * 3)]


def test_csv_and_tsv_cells_are_the_text_they_hold(tmp_path, tokenizer_dir):
    """No type or missing-value inference: "42" stays "42", "NA" stays "NA" (an input of "NA" is in
    the prompt), and a blank id cell leaves the other ids as written (they decide the eval split)."""
    rows = TEXT_CELLS + [{"id": "", "instruction": "No id.", "input": "", "output": "fine"}]
    expected = store_of([jsonl(tmp_path / "a.jsonl", rows)], tokenizer_dir, tmp_path / "s0", format="alpaca",
                        eval_fraction=0.3)
    header = list(rows[0])
    for name, sep in (("a.csv", ","), ("a.tsv", "\t")):
        (tmp_path / name).write_text(sep.join(header) + "\n" + "".join(sep.join(r[k] for k in header) + "\n"
                                                                         for r in rows))
        assert store_of([tmp_path / name], tokenizer_dir, tmp_path / name.replace(".", "_"), format="alpaca",
                        eval_fraction=0.3) == expected, name

    from llamajobs.data.hf_datasets import DatasetReader

    read = [record for _, record in DatasetReader(tmp_path / "a.csv")]
    assert read == rows  # every cell a string, the blank one ""


def test_csv_errors_name_the_line_the_row_starts_on(cli, tmp_path, tokenizer_dir):
    """Lines, not rows: a quoted cell spanning lines and blank lines count; a row of the wrong width
    is a bad line (skippable), a header naming a column twice is refused."""
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b'instruction,input,output\n'                # 1
                    b'"A question\nover two lines",,yes\n'      # 2-3
                    b'\n'                                        # 4
                    b'"Another\r\n\r\none",x,no\n'                # 5-7
                    b'Too,many,cells,here\n'                     # 8
                    b'Not \xff UTF-8,,no\n'                      # 9
                    b'last,,ok\n')                               # 10
    args = ("data", "prepare", str(bad), "--tokenizer", str(tokenizer_dir), "--format", "alpaca")
    code, _, err = cli(*args, "--out", str(tmp_path / "s"))
    assert code == 2 and f"{bad}:8: 4 cells, but the header has 3 columns" in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli(*args, "--out", str(tmp_path / "s"), "--skip-bad-lines", "--json")
    meta = json.loads(out)
    assert code == 0 and meta["documents"] == 3, err
    assert [line.split(": ")[0] for line in meta["bad_line_examples"]] == [f"{bad}:8", f"{bad}:9"]
    assert meta["bad_line_examples"][1].endswith("not valid UTF-8")
    (tmp_path / "twice.csv").write_text("instruction,output,output\na,b,c\n")
    code, _, err = cli("data", "prepare", str(tmp_path / "twice.csv"), "--tokenizer", str(tokenizer_dir), "--format",
                       "alpaca", "--out", str(tmp_path / "t"))
    assert code == 2 and f"{tmp_path / 'twice.csv'}:1: the header names the column 'output' twice" in err, err


def test_multiple_choice_csv_answers_are_read_from_text(tmp_path, tokenizer_dir):
    """MedMCQA's 1-based "cop" and MedQA's label come as text from a csv: the same store as JSON."""
    mcq = [{"question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1 + i % 4}
           for i in range(8)]
    medqa = [{"sent1": f"Q{i}?", **{f"ending{k}": f"e{k}" for k in range(5)}, "label": i % 5} for i in range(8)]
    for fmt, rows in (("medmcqa", mcq), ("medqa", medqa)):
        expected = store_of([jsonl(tmp_path / f"{fmt}.jsonl", rows)], tokenizer_dir, tmp_path / f"{fmt}0", format=fmt)
        datasets.Dataset.from_list(rows).to_csv(tmp_path / f"{fmt}.csv", index=False)
        assert store_of([tmp_path / f"{fmt}.csv"], tokenizer_dir, tmp_path / f"{fmt}1", format=fmt) == expected, fmt
    # a 4-option MedQA csv has an empty ending4 column when written beside 5-option rows: still 4 options
    four = [{k: v for k, v in r.items() if k != "ending4"} | {"label": i % 4} for i, r in enumerate(medqa)]
    expected = store_of([jsonl(tmp_path / "four.jsonl", four)], tokenizer_dir, tmp_path / "four0", format="medqa")
    (tmp_path / "four.csv").write_text("sent1,ending0,ending1,ending2,ending3,ending4,label\n" + "".join(
        f"{r['sent1']},e0,e1,e2,e3,,{r['label']}\n" for r in four))
    assert store_of([tmp_path / "four.csv"], tokenizer_dir, tmp_path / "four1", format="medqa") == expected


def test_a_parquet_file_is_read_a_row_group_at_a_time(tmp_path):
    """Arrow memory while reading stays near one batch, not the file (20 MB here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llamajobs.data.hf_datasets import DatasetReader

    path = tmp_path / "big.parquet"
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="none") as writer:
        for k in range(20):
            writer.write_table(pa.table({"text": ["x" * 2000 + str(k * 500 + i) for i in range(500)]}))
    assert path.stat().st_size > 19e6
    base, peak, rows = pa.total_allocated_bytes(), 0, 0
    for rows, record in DatasetReader(path):
        if rows % 250 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert rows == 10_000 and record["text"].endswith("9999")
    assert peak < 8e6, f"{peak / 1e6:.1f} MB of Arrow memory at once"
