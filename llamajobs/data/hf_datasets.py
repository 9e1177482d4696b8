"""Inputs kept the Hugging Face `datasets` way: local parquet, arrow and csv files and `save_to_disk`
folders (the optional extra `llamajobs[datasets]`: `datasets` and its pyarrow).

Records are streamed, so a corpus larger than memory works: a `save_to_disk` folder is memory-mapped
by `datasets.load_from_disk` and walked row by row (a saved DatasetDict is its train split: its
other splits are never trained on); parquet and arrow files are read a record batch at a
time by pyarrow itself (parquet without pre-buffering, arrow memory-mapped). Not through
`load_dataset("parquet", streaming=True)`: its scanner held most of the file in Arrow memory
(measured here: 158 MB of Arrow allocations at once for a 200 MB file of 500-row groups, against 3 MB
for ParquetFile.iter_batches). Nothing is fetched: the files are local, HF_DATASETS_OFFLINE is set
before `datasets` is imported (unless the environment says otherwise), and streaming writes no cache.
Every record carries its row (1-based), which error messages give as PATH:N like a JSON-lines file's
line.

CSV and TSV are read by Python's csv module, not by `datasets` (which hands them to pandas): every
cell is the text the file holds. pandas would infer types and missing values, so an answer "42"
became a number, "NA", "NULL" or "None" became missing, and one blank cell turned a column of ids
into floats. A csv record's number is the file line its row starts on (the header is line 1; a
quoted cell may span lines).

JSON lines (.jsonl, .json, .gz) stay on the project's own reader (formats.py): it streams too, and
knows JSON lists and whole-file documents.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

from llamajobs.data import readers
from llamajobs.errors import SpecError

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
BATCH_ROWS = 1024  # parquet rows decoded at a time
SAVED_MARKERS = ("state.json", "dataset_info.json")  # what save_to_disk writes beside its arrow files
DICT_MARKER = "dataset_dict.json"  # a saved DatasetDict: one folder per split
TRAIN_SPLIT = "train"
CSV_CELL_CHARS = 1 << 30  # the csv module's default limit (131072 characters) is below a full paper's text


def is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` folder (of a Dataset, or of a DatasetDict)."""
    return path.is_dir() and ((path / DICT_MARKER).is_file() or all((path / m).is_file() for m in SAVED_MARKERS))


def training_split(path: Path) -> Path:
    """The folder to read of a saved dataset: a DatasetDict's train split (its other splits are
    held out by whoever made them, never trained on), a Dataset's own folder."""
    if not (path / DICT_MARKER).is_file():
        return path
    try:
        splits = json.loads((path / DICT_MARKER).read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SpecError(f"INPUT {path}: its {DICT_MARKER} is damaged (no list of splits)") from None
    if TRAIN_SPLIT not in splits or not is_saved_dataset(path / TRAIN_SPLIT):
        raise SpecError(f"INPUT {path} is a saved DatasetDict with splits {', '.join(map(str, splits))} and no "
                        f"{TRAIN_SPLIT} split; give the folder of the split to train on")
    return path / TRAIN_SPLIT


def is_dataset_input(path: Path) -> bool:
    return Path(path).suffix.lower() in FILE_BUILDERS or is_saved_dataset(Path(path))


def input_bytes(path: Path) -> int:
    """The bytes of an input: a file's size, a saved folder's files together (for progress)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never ask the Hub
    try:
        import datasets
    except ImportError:
        raise SpecError("parquet and arrow inputs and save_to_disk folders are read with the `datasets` "
                        "library: pip install 'llamajobs[datasets]' (or datasets)") from None
    datasets.disable_progress_bars()
    return datasets


def _arrow_batches(path: Path) -> Iterator[Any]:
    """An Arrow IPC file's record batches, memory-mapped (the file format, or the stream format that
    save_to_disk writes)."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        batches = iter(pa.ipc.open_stream(source))
    yield from batches


def _rows_of(batches: Iterator[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch.to_pylist()


class DatasetReader:
    """(row, record) of a dataset input in order; `position` estimates the input bytes read so far
    (the rows read as a share of the rows there are, when the format says how many)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.position = 0
        self._bytes = input_bytes(self.path)
        self._rows: int | None = None
        self._csv: readers.CountingReader | None = None  # csv: the bytes read are the position
        self._dataset = self._open()

    def _open(self) -> Iterator[tuple[int, Any]]:
        if self.path.suffix.lower() in (".csv", ".tsv"):
            f, self._csv = readers.open_binary(self.path)
            return csv_records(self.path, f, "\t" if self.path.suffix.lower() == ".tsv" else ",")
        datasets = _datasets()
        try:
            if is_saved_dataset(self.path):
                saved = datasets.load_from_disk(str(self.path))  # memory-mapped arrow, not read into memory
                if isinstance(saved, datasets.DatasetDict):
                    raise SpecError(f"INPUT {self.path} is a saved DatasetDict with splits {', '.join(saved)}; "
                                    f"give one split's folder, e.g. {self.path / next(iter(saved))}")
                self._rows = len(saved)
                return enumerate(saved, 1)
            if FILE_BUILDERS[self.path.suffix.lower()] == "parquet":
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(self.path, pre_buffer=False)
                self._rows = parquet.metadata.num_rows
                return enumerate(_rows_of(parquet.iter_batches(batch_size=BATCH_ROWS)), 1)
            return enumerate(_rows_of(_arrow_batches(self.path)), 1)
        except SpecError:
            raise
        except Exception as e:  # pyarrow and datasets raise many kinds for a file that is not what it says
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError(f"INPUT {self.path}: cannot be read as {self.path.suffix or 'a saved dataset'} "
                            f"({first})") from None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        row = 0
        try:
            for row, record in self._dataset:
                if self._csv is not None:
                    self.position = self._csv.position
                elif self._rows:
                    self.position = self._bytes * row // self._rows
                yield row, record
        except readers.FileError:  # names its line already
            raise
        except Exception as e:  # a damaged file found midway: name where
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError(f"{self.path}:{row + 1}: cannot be read ({first})") from None
        self.position = self._bytes

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._csv is not None:
            self._csv.close()
        self._dataset = None


def csv_records(path: Path, f: Any, delimiter: str) -> Iterator[tuple[int, Any]]:
    """(line, record) of a csv file read from the binary stream f: each row after the header as a
    {column: cell text}, numbered by the line it starts on. A row with more or fewer cells than the
    header, or with bytes that are not UTF-8, is Unreadable (a bad line); a header that names a
    column twice is a FileError (every row would lose a cell)."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_CELL_CHARS))
    # newline="": the csv module's own line handling (a quoted cell may hold line breaks). Bytes
    # that are not UTF-8 become lone surrogates, which valid UTF-8 never decodes to: the row
    # holding them is a bad line, the rows around it stay readable.
    lines = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    try:
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return
            if not row:  # a blank line
                continue
            if header is None:
                if _not_utf8(row):
                    raise readers.FileError(path, start, "the header is not valid UTF-8")
                twice = next((name for name in row if row.count(name) > 1), None) if len(set(row)) < len(row) else None
                if twice is not None:
                    raise readers.FileError(path, start, f"the header names the column {twice!r} twice")
                header = row
            elif _not_utf8(row):
                yield start, readers.Unreadable("not valid UTF-8")
            elif len(row) != len(header):
                yield start, readers.Unreadable(f"{len(row)} cells, but the header has {len(header)} columns")
            else:
                yield start, dict(zip(header, row))
    except csv.Error as e:  # (a NUL byte, a cell longer than CSV_CELL_CHARS): the reader cannot go on
        raise readers.FileError(path, reader.line_num, f"not valid csv ({e})") from None


def _not_utf8(row: list[str]) -> bool:
    return not all(map(readers.is_utf8, row))
