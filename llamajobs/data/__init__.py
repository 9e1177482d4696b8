"""Data for the worker and the CLI: tokenizer training/loading, the bundled sample corpus, samplers.

`sample/` is package data (a JSONL corpus), not a package: it has no __init__.py on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from llamajobs.errors import SpecError

SAMPLE_CORPUS = Path(__file__).parent / "sample" / "pmc_sample.jsonl"


def read_texts(path: str | Path = SAMPLE_CORPUS) -> Iterator[str]:
    """The "text" field of every line of a JSONL corpus, in file order."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SpecError(f"{path}:{number}: expected a JSON object with a \"text\" field") from None


def read_text_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Texts for tokenizer training: JSONL files give their "text" fields, other files their lines."""
    for path in map(Path, paths):
        try:
            if path.suffix == ".jsonl":
                yield from read_texts(path)
            else:
                with open(path, encoding="utf-8") as f:
                    yield from (line.rstrip("\n") for line in f if line.strip())
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
