"""Options shared by several commands, defined once (pip-tools' scripts/options.py). Every default of
a JobSpec field lives in the JobSpec, so none is given here: an option left out is None, and only
the flags the user typed reach the spec (over the run YAML and the site profile)."""

from __future__ import annotations

from typing import Any, Callable

import click
from click.core import ParameterSource

from llamajobs import catalog, ops
from llamajobs.values import DEVICES, LIMITS


class Choice(click.Choice):
    """A flag's fixed values, from their registry: --help lists them and shell completion offers them.
    A value outside them goes on to the spec (or the operation), whose refusal names the flag the same
    way whether the value came from a flag, a run YAML or the site profile."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return value


def within(name: str, kind: type = click.IntRange, **kw: Any) -> click.ParamType:
    """A click type bounded by values.LIMITS[name], for a count or size that is no JobSpec field (the
    spec checks its own): the range lives in one place, and the error names the value and the range."""
    low, high = LIMITS[name]
    return kind(min=low, max=high, **kw)


def _opt(*names: str, **kw: Any) -> Callable:
    return click.option(*names, default=None, **kw)


def _names(values: tuple[str, ...] | list[str]) -> str:
    """a, b or c"""
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else "".join(values)


# Where a job runs and how it is queued: submit's, and `eval --cluster`'s.
PLACEMENT_OPTIONS = [
    _opt("--nodes", type=int), _opt("--gpus-per-node", type=int),
    _opt("--procs-per-node", type=int, help="Worker processes per node (default: one per GPU, 2 without GPUs)."),
    _opt("--cpus-per-node", type=int, help="CPUs of each node's task (default: 4 per worker process)."),
    _opt("--mem-per-node", help="SLURM --mem of each node (default 0: all of it)."),
]
QUEUE_OPTIONS = [
    _opt("--device", type=Choice(DEVICES), help="auto is decided on the compute node."),
    _opt("--partition"), _opt("--account"), _opt("--qos"),
    _opt("--time", help="SLURM time limit, HH:MM:SS or D-HH:MM:SS."),
    _opt("--constraint"), _opt("--exclusive/--no-exclusive"), _opt("--exclude"),
    _opt("--mail-user"), _opt("--mail-type"),
    _opt("--after", help="Start only after these jobs completed (comma list)."),
]
TRAINING_OPTIONS = [
    _opt("--size", type=Choice(tuple(catalog.SIZES)), help="Model size. Ignored with --model-path."),
    _opt("--strategy", type=Choice(catalog.STRATEGIES)),
    _opt("--mode", type=Choice(catalog.MODES)),
    _opt("--lora-r", type=int), _opt("--lora-alpha", type=int), _opt("--lora-dropout", type=float),
    _opt("--lora-targets", help="Comma list of module names, e.g. q_proj,v_proj."),
    _opt("--num-virtual-tokens", type=int, help=f"Virtual tokens trained by --mode {_names(catalog.PROMPT_MODES)}."),
    _opt("--model-path", help=f"HF model directory or Hub id org/name[@revision] ({', '.join(catalog.FAMILIES)}); "
                              "the shape is read from its config.json."),
    _opt("--init-from", help="Start from another run's final/ (JOB id or DIR)."),
    _opt("--data", help="A token store from `llamajobs data prepare`; default: the bundled sample corpus."),
    _opt("--epochs", type=float), _opt("--max-steps", type=int),
    _opt("--tokens-per-epoch", help="Tokens in one epoch, e.g. 2.5B."),
    _opt("--seq-len", type=int), _opt("--global-batch", type=int), _opt("--micro-batch", help="auto (default: the fastest that fits the GPU planned) or a number."),
    _opt("--lr", type=float), _opt("--warmup-ratio", type=float), _opt("--weight-decay", type=float),
    _opt("--activation-checkpointing/--no-activation-checkpointing"),
    _opt("--compile/--no-compile"), _opt("--seed", type=int),
    _opt("--kernels", type=Choice(catalog.KERNELS),
         help="liger (default): Liger's fused kernels on CUDA, for the families it covers, the plain modules "
              "elsewhere; none: the plain modules."),
    _opt("--objective", type=Choice(catalog.OBJECTIVES),
         help="sft (default): the next-token loss on the data's targets; dpo: preference tuning on a store from "
              "`data prepare --format preference` (LoRA: the reference is the base, adapters disabled)."),
    _opt("--beta", type=float, help="--objective dpo: the weight of the KL penalty to the reference (default 0.1)."),
    _opt("--loss", type=Choice(catalog.DPO_LOSSES), help="--objective dpo: sigmoid (DPO's, default) or ipo."),
    _opt("--fp8/--no-fp8", help="Float8 linears (torchao) for full fine-tunes under fsdp with --compile, on "
                                "H100-class GPUs."),
    _opt("--shard-within", type=Choice(catalog.SHARD_WITHIN),
         help="fsdp strategies on several nodes: node shards each layer within a node and replicates across "
              "nodes (one gradient all-reduce per step crosses the network), all shards over every GPU; auto "
              "(default): the estimator picks the faster that fits."),
    *PLACEMENT_OPTIONS,
]
JOB_OPTIONS = [
    _opt("--checkpoint-every-steps", type=int), _opt("--checkpoint-every-minutes", type=float),
    _opt("--resume/--no-resume", help="Resume from the run's latest checkpoint (default: yes)."),
    _opt("--merge/--no-merge", help="LoRA: also write a merged full model into final/merged."),
    _opt("--log-every-steps", type=int),
    _opt("--eval-every-steps", type=int, help="Validation loss on the --data store's eval split every N steps "
                                              "(always after the last step when the store has one)."),
    _opt("--eval-batches", type=int, help="Each validation over at most N micro-batches on each rank, the eval "
                                          "split's first ones (default: all of it)."),
    _opt("--keep-checkpoints", type=int), _opt("--max-requeues", type=int),
    _opt("--collective-timeout-minutes", type=float,
         help="How long the ranks wait for one that went silent before the job fails (default 30)."),
    _opt("--cluster", type=Choice(catalog.CLUSTERS), help="Default: slurm when `scontrol ping` answers."),
    *QUEUE_OPTIONS,
    _opt("--launcher", type=Choice(catalog.LAUNCHERS)), _opt("--name"),
    _opt("--wandb", help="Also log to this Weights & Biases [ENTITY/]PROJECT. Offline (RUN_DIR/wandb, upload with "
                         "`wandb sync`) unless WANDB_API_KEY or WANDB_MODE is set where the job runs."),
    _opt("--hold/--no-hold"),
    _opt("--config", "config_file", type=click.Path(dir_okay=False),
         help="A run YAML with the same keys as the flags, or a preset's name (`llamajobs presets`); a file of "
              "that name wins."),
]


def options(opts: list[Callable], without: frozenset[str] = frozenset()) -> Callable:
    """The options, less those named in `without` (a command that gives the flag its own meaning)."""
    def decorate(f: Callable) -> Callable:
        for option in reversed(opts):
            f = option(f)
        f.__click_params__ = [p for p in f.__click_params__ if p.name not in without]
        return f
    return decorate


def typed(values: dict[str, Any]) -> dict[str, Any]:
    """Only the flags the user typed: click defaults must not shadow the profile or the run YAML."""
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in values.items() if v is not None and ctx.get_parameter_source(k) in given}


def runs_dir_option(f: Callable) -> Callable:
    return click.option("--runs-dir", envvar="LLAMAJOBS_RUNS", default=None,
                        help="Run directories (default $LLAMAJOBS_HOME/runs); on a cluster they must be "
                             "on the shared filesystem.")(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(f)


# A job id is a small integer; click's int would take any length (and SQLite overflows on it).
JOB_ID = click.IntRange(min=1, max=ops.MAX_JOB_ID - 1)
job_argument = click.argument("job_id", type=JOB_ID, metavar="JOB")
optional_job_argument = click.argument("job_id", type=JOB_ID, required=False, metavar="[JOB]")
