"""Where rank 0's metric rows go besides metrics.jsonl: TensorBoard event files (when tensorboard is
installed) and a Weights & Biases run (with --wandb PROJECT). MetricsLogger makes the rows; a sink
only copies their numbers out.

Both packages are imported here, lazily: the worker runs without either installed.

    RUN_DIR/tensorboard/      events.out.tfevents.*  (`tensorboard --logdir RUN_DIR/tensorboard`)
    RUN_DIR/wandb/            wandb's own folders; offline-run-*/ for `wandb sync` to upload later

wandb runs offline unless the environment says otherwise: WANDB_MODE as set, else online only when
WANDB_API_KEY is set (compute nodes often have no internet; an offline run never blocks training).
The key is read from the environment by wandb itself and never written anywhere by llamajobs.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import Protocol

from llamajobs.metrics import MetricsRow
from llamajobs.spec import JobSpec

# Row fields that are bookkeeping, not curves: the step is the x axis; the others never change or
# are clock readings.
NOT_SCALARS = ("step", "total_steps", "time", "peak_flops")
WANDB_RUN_ID = "llamajobs-run-id"  # in RUN_DIR/wandb: a requeued attempt continues the same wandb run


class Sink(Protocol):
    def write(self, row: MetricsRow) -> None: ...

    def close(self) -> None: ...


def scalars(row: MetricsRow) -> dict[str, float]:
    """The numbers of a metrics row worth plotting against its step (the same names as metrics.jsonl)."""
    values = ((field.name, getattr(row, field.name)) for field in dataclasses.fields(row))
    return {key: value for key, value in values
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardSink:
    def __init__(self, folder: Path, *, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops an earlier attempt's events from this step on (they are redone).
        self.writer = SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)

    def write(self, row: MetricsRow) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row.step, walltime=row.time)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, spec: JobSpec) -> None:
        import wandb

        entity, _, project = spec.wandb.rpartition("/")
        offline = "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY")
        self.run = wandb.init(
            entity=entity or None, project=project, name=run_dir.name, id=wandb_run_id(run_dir), resume="allow",
            dir=str(run_dir), config=dataclasses.asdict(spec), mode="offline" if offline else None,
            # torchrun already keeps every rank's output; wandb's console capture would wrap stdout again.
            settings=wandb.Settings(console="off"))
        # The x axis is the optimizer step, logged as a value: a resumed attempt redoes steps past its
        # checkpoint, which wandb's own monotonic step counter would drop.
        self.run.define_metric("*", step_metric="step")  # (offline, wandb prints the `wandb sync` to run)

    def write(self, row: MetricsRow) -> None:
        self.run.log({**scalars(row), "step": row.step})

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run id of this run dir: made on the first attempt, kept for the requeued ones."""
    path = run_dir / "wandb" / WANDB_RUN_ID
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(secrets.token_hex(4) + "\n")  # random: run dirs of other clusters share names
    return path.read_text().strip()


def open_sinks(run_dir: Path, spec: JobSpec, *, start: int) -> list[Sink]:
    """Rank 0's sinks for a run starting after step `start`: TensorBoard when installed, wandb when asked."""
    sinks: list[Sink] = []
    try:
        sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_step=start + 1 if start else None))
    except ImportError:
        print("tensorboard is not installed: no event files (metrics.jsonl, `llamajobs status` and "
              "`llamajobs plot` hold the curves)", flush=True)
    if spec.wandb:
        try:
            sinks.append(WandbSink(run_dir, spec))
        except ImportError:
            raise RuntimeError(f"--wandb {spec.wandb}: the wandb package is not installed where the worker runs; "
                               "pip install wandb there, or leave --wandb out") from None
    return sinks
