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
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = cli("data", "prepare", str(tmp_path / "bad.csv"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca")
    assert code == 2 and f"{tmp_path / 'bad.csv'}:4: " in err, err  # the header is line 1
    code, _, err = cli("data", "prepare", str(tmp_path / "bad.parquet"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca", "--skip-bad-lines", "--json")
    assert code == 0 and json.loads(_)["skipped_bad_lines"] == 1


def test_a_saved_dataset_dict_and_a_damaged_file_are_one_line(cli, tmp_path, tokenizer_dir):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA), "test": datasets.Dataset.from_list(ALPACA)}
                         ).save_to_disk(tmp_path / "dd")
    code, _, err = cli("data", "prepare", str(tmp_path / "dd"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca")
    assert code == 2 and "a saved DatasetDict with splits train, test; give one split's folder" in err, err
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    code, _, err = cli("data", "prepare", str(tmp_path / "x.parquet"), "--tokenizer", str(tokenizer_dir), "--out",
                       str(tmp_path / "s"), "--format", "alpaca")
    assert code == 2 and "x.parquet" in err and len(err.strip().splitlines()) == 1, err


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
