"""The data commands' views: prepare's progress and result, a store's description (data inspect)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from llamajobs.data.prepare import Progress
from llamajobs.data.results import Prepared, Unfinished
from llamajobs.views import err, out

class PrepareProgress:
    """`data prepare`'s progress on stderr: input bytes read, documents and tokens with their rates. On
    a terminal a live bar (cleared when an error follows, so the error is the only thing there);
    elsewhere (a log file, a pipe) whole lines, one every LINE_SECONDS and one at the end, each ended
    before anything else is printed: a live bar's cursor controls (FORCE_COLOR, TTY_COMPATIBLE make
    rich draw one into a file) would leave an error glued to it. Use as a context manager; call it
    with each data.prepare.Progress."""

    LINE_SECONDS = 30.0

    def __init__(self, console: Console = err) -> None:
        from rich.progress import (BarColumn, Progress as Bar, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console
        self.live = _isatty(console.file)
        self.bar = Bar(TextColumn("{task.fields[label]}"), BarColumn(), TaskProgressColumn(),
                       TextColumn("{task.fields[mb_s]:.1f} MB/s"),
                       TextColumn("{task.fields[docs]:,} docs ({task.fields[docs_s]:,.0f}/s)"),
                       TextColumn("{task.fields[tokens]:,} tokens ({task.fields[tokens_s]:,.0f}/s)"),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self.task = None
        self.last: Progress | None = None
        self.printed_at = time.monotonic()  # the first line after LINE_SECONDS: a short run's error stands alone

    def __enter__(self) -> PrepareProgress:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.live and self.task is not None:
            self.bar.live.transient = exc_type is not None  # an error is then the only thing on stderr
            self.bar.stop()
        elif not self.live and self.last is not None and exc_type is None:
            self._line(self.last)

    def __call__(self, p: Progress) -> None:
        if not self.live:
            self.last = p
            if time.monotonic() - self.printed_at >= self.LINE_SECONDS:
                self._line(p)
            return
        fields = _rates(p)
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("prepare", total=p.total_bytes or None, **fields)
        self.bar.update(self.task, completed=p.bytes_read, **fields)

    def _line(self, p: Progress) -> None:
        f = _rates(p)
        done = f" {100 * p.bytes_read / p.total_bytes:.0f}%" if p.total_bytes else ""
        self.console.file.write(f"{f['label']}{done} {f['mb_s']:.1f} MB/s {f['docs']:,} docs ({f['docs_s']:,.0f}/s) "
                                f"{f['tokens']:,} tokens ({f['tokens_s']:,.0f}/s) {p.elapsed_s:.0f} s\n")
        self.console.file.flush()
        self.printed_at = time.monotonic()


def _rates(p: Progress) -> dict[str, Any]:
    rate = 1 / max(p.elapsed_s, 1e-9)
    return {"label": p.label, "mb_s": p.bytes_read / 1e6 * rate, "docs": p.documents, "docs_s": p.documents * rate,
            "tokens": p.tokens, "tokens_s": p.tokens * rate}


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


def prepared(out_dir: str, result: Prepared | Unfinished) -> None:
    if isinstance(result, Unfinished):
        out.print(f"{result.workdir}: {result.counts}; `llamajobs data inspect {out_dir}` shows the shards; "
                  f"rerun the same command to wait for them and merge", markup=False)
        return
    held = result.eval_split
    out.print(f"{out_dir}: {result.documents:,} documents, {result.tokens:,} tokens ({result.dtype})"
              + (f"; eval split: {held.documents:,} documents, {held.tokens:,} tokens" if held else ""),
              markup=False)
    if pairs := result.pairs:
        out.print(f"{pairs.count:,} preference pairs (chosen and rejected answers); "
                  f"{pairs.truncated:,} truncated to --max-length {pairs.max_length}", markup=False)
    if done := result.sharded:
        out.print(f"{done.shards} shard(s) on the {done.cluster} cluster"
                  + (f" ({done.shards_requested} requested: whole files are not split)"
                     if done.shards < done.shards_requested else "")
                  + f", {done.seconds:.1f} s; merge {done.merge_seconds:.2f} s")
    if result.skipped_empty or result.skipped_bad_lines:
        err.print(f"skipped {result.skipped_empty:,} empty documents and {result.skipped_bad_lines:,} bad lines"
                  + "".join(f"\n  {line}" for line in result.bad_line_examples), markup=False)


STORE_KEYS = ("path", "format", "documents", "tokens", "dtype", "loss_mask", "vocab_size", "fingerprint",
              "tokenizer", "mean_document_tokens", "max_document_tokens", "bytes_on_disk", "skipped_empty",
              "skipped_bad_lines", "eval")


def store(info: dict[str, Any]) -> None:
    """`data inspect`: the store's numbers and one decoded document; or an unfinished preparation's shards."""
    if info.get("unfinished"):
        _unfinished(info)
        return
    table = Table(box=None, show_header=False)
    for key in STORE_KEYS:
        value = info[key]
        table.add_row(key, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int)
                      else str(value))
    out.print(table)
    sample = info["sample"]
    if not sample:
        return
    out.print(f"\ndocument {sample['document']} ({sample['tokens']:,} tokens)"
              + (", first tokens shown" if sample.get("truncated") else "") + ":", style="bold")
    if sample.get("note"):
        out.print(sample["note"], style="yellow", markup=False)
    if "segments" in sample and "prompt" not in sample:  # chat: turns in and out of the loss
        out.print("[trained on: green; masked out of the loss: dim]", style="dim", markup=False)
        for segment in sample["segments"]:
            out.print(segment["text"], style="green" if segment["target"] else "dim", markup=False, highlight=False,
                      end="")
        out.print()
    elif "prompt" in sample:
        out.print("[prompt, masked out of the loss]", style="dim", markup=False)
        out.print(sample["prompt"], markup=False, highlight=False)
        out.print("[response, trained on]", style="dim", markup=False)
        out.print(sample["response"], markup=False, highlight=False)
    elif sample.get("text") is not None:
        out.print(sample["text"], markup=False, highlight=False)
    else:
        out.print(f"ids: {sample['first_ids']} ...")


def _unfinished(info: dict[str, Any]) -> None:
    """`data inspect` of a sharded preparation that is not finished: one row per shard."""
    counts = ", ".join(f"{n} {state}" for state, n in info["counts"].items())
    out.print(f"{info['path']}: unfinished sharded preparation in {info['workdir']} ({counts}); "
              f"rerun the same `data prepare` command to finish it", markup=False)
    table = Table(box=None, header_style="bold")
    for column in ("shard", "state", "MB", "documents", "tokens", "host", "job", "note"):
        table.add_column(column)
    for row in info["shards"]:
        note = row.get("error") or (f"{row['done_fraction']:.0%}, updated {row['updated_s_ago']:.0f} s ago"
                                    if "done_fraction" in row else f"{row['seconds']} s" if "seconds" in row else "")
        table.add_row(str(row["index"]), row["state"], f"{row['bytes'] / 1e6:,.1f}",
                      f"{row['documents']:,}" if "documents" in row else "",
                      f"{row['tokens']:,}" if "tokens" in row else "", row.get("host") or "", row.get("job") or "",
                      note)
    out.print(table)


