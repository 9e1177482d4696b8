"""Inputs kept the Hugging Face `datasets` way: local parquet, arrow and csv files and `save_to_disk`
folders (the optional extra `llamajobs[datasets]`: `datasets` and its pyarrow).

Records are streamed, so a corpus larger than memory works: a `save_to_disk` folder is memory-mapped
by `datasets.load_from_disk` and walked row by row; csv goes through `load_dataset("csv",
streaming=True)` (pandas reads it in chunks); parquet and arrow files are read a record batch at a
time by pyarrow itself (parquet without pre-buffering, arrow memory-mapped). Not through
`load_dataset("parquet", streaming=True)`: its scanner held most of the file in Arrow memory
(measured here: 158 MB of Arrow allocations at once for a 200 MB file of 500-row groups, against 3 MB
for ParquetFile.iter_batches). Nothing is fetched: the files are local, HF_DATASETS_OFFLINE is set
before `datasets` is imported (unless the environment says otherwise), and streaming writes no cache. Every record carries its row (1-based; a csv file's line, the header
being line 1), which error messages give as PATH:N like a JSON-lines file's line.

JSON lines (.jsonl, .json, .gz) stay on the project's own reader (formats.py): it streams too, and
knows JSON lists and whole-file documents.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from llamajobs.errors import SpecError

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}
BATCH_ROWS = 1024  # parquet rows decoded at a time
SAVED_MARKERS = ("state.json", "dataset_info.json")  # what save_to_disk writes beside its arrow files
DICT_MARKER = "dataset_dict.json"  # a saved DatasetDict: one folder per split


def is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` folder (of a Dataset, or of a DatasetDict)."""
    return path.is_dir() and ((path / DICT_MARKER).is_file() or all((path / m).is_file() for m in SAVED_MARKERS))


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
        raise SpecError("parquet, arrow and csv inputs and save_to_disk folders are read with the `datasets` "
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
        self._first_row = 2 if self.path.suffix.lower() in (".csv", ".tsv") else 1
        self._dataset = self._open()

    def _open(self) -> Any:
        datasets = _datasets()
        try:
            if is_saved_dataset(self.path):
                saved = datasets.load_from_disk(str(self.path))  # memory-mapped arrow, not read into memory
                if isinstance(saved, datasets.DatasetDict):
                    raise SpecError(f"INPUT {self.path} is a saved DatasetDict with splits {', '.join(saved)}; "
                                    f"give one split's folder, e.g. {self.path / next(iter(saved))}")
                self._rows = len(saved)
                return saved
            builder = FILE_BUILDERS[self.path.suffix.lower()]
            if builder == "parquet":
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(self.path, pre_buffer=False)
                self._rows = parquet.metadata.num_rows
                return _rows_of(parquet.iter_batches(batch_size=BATCH_ROWS))
            if builder == "arrow":
                return _rows_of(_arrow_batches(self.path))
            options = {"delimiter": "\t"} if self.path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(self.path), split="train", streaming=True, **options)
        except SpecError:
            raise
        except Exception as e:  # pyarrow and datasets raise many kinds for a file that is not what it says
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError(f"INPUT {self.path}: cannot be read as {self.path.suffix or 'a saved dataset'} "
                            f"({first})") from None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        row = 0
        try:
            for row, record in enumerate(self._dataset, self._first_row):
                if self._rows:
                    self.position = self._bytes * (row - self._first_row + 1) // self._rows
                yield row, record
        except Exception as e:  # a damaged file found midway: name where
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SpecError(f"{self.path}:{row + 1}: cannot be read ({first})") from None
        self.position = self._bytes

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._dataset = None
