"""Data: token stores (data prepare, data inspect) and tokenizers (tokenizer train)."""

from __future__ import annotations

from pathlib import Path

import click

from llamajobs import ops, views
from llamajobs.data import views as data_views
from llamajobs.cli.options import Choice, json_option
from llamajobs.data.chat import TEMPLATES, TRAIN_ON
from llamajobs.data.formats import FORMATS
from llamajobs.data.prepare import MAX_EVAL_FRACTION, MAX_WORKERS
from llamajobs.data.sharded_prepare import CLUSTERS, MAX_CPUS_PER_TASK, MAX_SHARDS

_CHAT = "/".join(name for name, fmt in FORMATS.items() if fmt.chat)  # the formats of conversations


@click.group()
def data() -> None:
    """Token stores: prepare them from corpora and instruction sets, inspect them."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(),
              help="The model's directory (tokenizer.model or tokenizer.json), a tokenizer.model file, or a "
                   "Hub id (org/name[@revision]) found in or downloaded into the Hugging Face cache.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The store directory to write (written aside, renamed when complete).")
@click.option("--format", "fmt", type=Choice(tuple(FORMATS)), default="text", show_default=True,
              help="The inputs' layout (JSON lines, a JSON list, or .gz of either).")
@click.option("--chat-template", type=Choice(TEMPLATES), default=None,
              help=f"{_CHAT}: render with this template instead of the tokenizer's own chat template (needed when "
                   "its tokenizer_config.json has none).")
@click.option("--train-on", type=Choice(TRAIN_ON), default="assistant", show_default=True,
              help=f"{_CHAT}: the loss covers assistant turns, or all turns.")
@click.option("--max-length", type=int, default=512, show_default=True,
              help="--format preference: each answer with its prompt at most this many tokens (the prompt's "
                   "beginning is cut first); use submit's --seq-len.")
@click.option("--workers", type=int, default=1, show_default=True,
              help=f"Tokenizing processes (per shard); at most {MAX_WORKERS} here (4 per CPU). No more start than "
                   f"the CPUs this process may use, nor than the input's 1 MB chunks.")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed lines instead of stopping at the first.")
@click.option("--eval-fraction", type=float, default=0.0, show_default=True,
              help=f"Hold out this fraction of documents (by a hash of their id) into DIR/eval; 0 to "
                   f"{MAX_EVAL_FRACTION}.")
@click.option("--force", is_flag=True, help="Replace an existing --out that is a token store, once the new store is "
              "complete (anything else is refused); with --shards, also discard an unfinished preparation made "
              "with other settings.")
@click.option("--shards", type=int, default=None,
              help=f"Split the inputs into N shards of equal bytes (1 to {MAX_SHARDS:,}), one array task each, in "
                   f"DIR.parts; rerun the same command to finish after an interruption or failed tasks.")
@click.option("--cluster", type=Choice(CLUSTERS), default=None,
              help="Where shards run (default: the site profile's, else slurm when `scontrol ping` answers).")
@click.option("--partition", default=None, help="SLURM partition of the shards (default: the site profile's).")
@click.option("--account", default=None, help="SLURM account of the shards (default: the site profile's).")
@click.option("--time", "time_limit", default=None,
              help="Each shard's time limit, HH:MM:SS (default: the site profile's, else the partition's).")
@click.option("--cpus-per-task", type=int, default=None,
              help=f"CPUs of each shard's task, 1 to {MAX_CPUS_PER_TASK} (default: --workers).")
@click.option("--mem", default=None, help="SLURM --mem of each shard's task, at most 64T (default: the cluster's).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the shards and merge them; --no-wait submits and returns (rerun to wait and merge).")
@json_option
def data_prepare(inputs: tuple[str, ...], tokenizer_path: str, out_dir: str, fmt: str, chat_template: str | None,
                 train_on: str, max_length: int, workers: int,
                 skip_bad_lines: bool, eval_fraction: float, force: bool, shards: int | None, cluster: str | None,
                 partition: str | None, account: str | None, time_limit: str | None, cpus_per_task: int | None,
                 mem: str | None, wait: bool, as_json: bool) -> None:
    """Tokenize corpora or instruction sets into a token store for `submit --data`.

    INPUT is a file (JSON lines, a JSON list, or .gz of either; parquet, arrow, csv or tsv), a save_to_disk
    folder (a DatasetDict: its train split), or a directory of them."""
    from llamajobs.data.prepare import PrepareConfig, eval_split_warning

    config = PrepareConfig(inputs=tuple(Path(p) for p in inputs), tokenizer=ops.tokenizer_source(tokenizer_path),
                           out=Path(out_dir),
                           format=fmt, workers=workers, skip_bad_lines=skip_bad_lines, eval_fraction=eval_fraction,
                           force=force, chat_template=chat_template, train_on=train_on,
                           max_length=max_length)
    sharding = {"cluster": cluster, "partition": partition, "account": account, "time": time_limit,
                "cpus_per_task": cpus_per_task, "mem": mem}
    with data_views.PrepareProgress() as progress:
        result = ops.prepare_data(config, shards, sharding, wait, progress, on_submit=views.note)
    views.print_json(result.to_json()) if as_json else data_views.prepared(out_dir, result)
    if warning := eval_split_warning(result.to_json()):
        views.note(warning)


@data.command("inspect")
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.option("--document", type=int, default=0, show_default=True,
              help="Which document to decode as the sample (negative: counting from the end, -1 the last).")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(),
              help="Decode with this tokenizer (default: the one the store was made with).")
@json_option
def data_inspect(store_dir: str, document: int, tokenizer_path: str | None, as_json: bool) -> None:
    """Documents, tokens, dtype, tokenizer fingerprint and a decoded sample of a token store."""
    from llamajobs.data.inspect import describe

    info = describe(store_dir, tokenizer=str(ops.tokenizer_source(tokenizer_path)) if tokenizer_path else None,
                    document=document)
    views.print_json(info) if as_json else data_views.store(info)


@click.group()
def tokenizer() -> None:
    """Tokenizers."""


@tokenizer.command("train")
@click.argument("texts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--vocab-size", type=click.IntRange(min=1), required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def tokenizer_train(texts: tuple[str, ...], vocab_size: int, out_dir: str) -> None:
    """Train a LLaMA-style sentencepiece BPE model on text files (plain text or JSONL with "text")."""
    from llamajobs.data import read_text_files
    from llamajobs.data.tokenizer import train_tokenizer

    views.wrote(train_tokenizer(read_text_files(texts), vocab_size, Path(out_dir)), "tokenizer written to")
