"""Throughput, MFU and memory, computed in one place, and rank 0's metrics.jsonl writer.

tokens/s is measured over the wall time of the steps since the last log (the host is synchronised
with the device by then: the logged loss has been fetched). MFU is model FLOPs (estimate.py, the
same count the estimator uses) over the catalog peak of the device, and the peak is named.

Each row also says where the step time went besides compute: data_wait_s, the host seconds per step
spent fetching the next batch and queueing its copy to the device (data_wait_frac of the step
time; on a GPU the host runs ahead of the device, so this costs step time only when the host falls
behind), and checkpoint_s, the seconds spent saving checkpoints since the previous row. Rows also
go to the optional sinks (TensorBoard, Weights & Biases: sinks.py).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from llamajobs.catalog import CPU_PEAK_FLOPS_PER_CORE, Accelerator, gpu_from_device_name
from llamajobs.metrics import METRICS_FILE, MetricsRow
from llamajobs.worker.checkpoint_files import write_atomically
from llamajobs.worker.sinks import Sink

if TYPE_CHECKING:
    from llamajobs.worker.validate import Validation


def catalog_gpu(device: torch.device) -> Accelerator | None:
    """The catalog's entry for a CUDA device (None: not in the catalog)."""
    props = torch.cuda.get_device_properties(device)
    return gpu_from_device_name(props.name, props.total_memory / 2**30)


def device_peak(device: torch.device) -> tuple[str, float | None]:
    """(name, dense bf16 FLOP/s) of one device; None when the card is not in the catalog."""
    if device.type == "cuda":
        gpu = catalog_gpu(device)
        return (gpu.name, gpu.peak_bf16_flops) if gpu else (torch.cuda.get_device_name(device), None)
    return "cpu-nominal", CPU_PEAK_FLOPS_PER_CORE * torch.get_num_threads()


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads per process)"


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated by this process, or its peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Rank 0 appends one JSON line per logged step to metrics.jsonl (the monitor tails it)."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, steps_per_epoch: int,
                 tokens_per_step: int, flops_per_token: float, world_size: int, device: torch.device,
                 sinks: Sequence[Sink] = ()) -> None:
        self.path = run_dir / METRICS_FILE
        self.sinks = list(sinks)
        self.enabled = enabled
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.device = device
        self.peak_name, self.peak_flops = device_peak(device)
        self.start_clock()

    def discard_after(self, step: int) -> None:
        """Keep only the rows of steps up to `step`, the step this attempt continues from: the rows an
        interrupted attempt logged past its last checkpoint are about to be logged again. Rewritten
        whole (tmp + os.replace): a reader sees the old file or the new one; torn lines are dropped."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        write_atomically(self.path, "".join(kept))

    def start_clock(self, step: int = 0) -> None:
        """Training starts now, after `step` steps (0, or the step a resumed run continues from)."""
        self.start_time = self.last_time = time.perf_counter()
        self.last_step = step
        self.last_checkpoint_total = 0.0

    def log(self, step: int, loss: float, lr: float, grad_norm: float, *, data_wait_s: float = 0.0,
            checkpoint_total_s: float = 0.0, validation: Validation | None = None,
            preference: dict[str, float] | None = None) -> MetricsRow:
        """One row for the steps since the last one. data_wait_s: the host seconds spent waiting for
        batches over those steps; checkpoint_total_s: the seconds spent saving checkpoints in this
        attempt so far (the row gets the part since the previous row); validation: the validation
        run after this step, if one did (its time is not step time); preference: DPO's statistics
        of the step (worker/dpo.STATS)."""
        now = time.perf_counter()
        steps = step - self.last_step
        val_s = validation.seconds if validation else 0.0
        step_time = (now - self.last_time - val_s) / steps
        tokens_per_s = self.tokens_per_step / step_time
        per_gpu = tokens_per_s / self.world_size  # per worker process: one per GPU
        mfu = self.flops_per_token * per_gpu / self.peak_flops if self.peak_flops else None
        checkpoint_s = checkpoint_total_s - self.last_checkpoint_total
        self.last_time, self.last_step, self.last_checkpoint_total = now, step, checkpoint_total_s
        row = MetricsRow(
            step=step, total_steps=self.total_steps, epoch=step / self.steps_per_epoch, loss=loss, lr=lr,
            grad_norm=grad_norm, tokens=step * self.tokens_per_step, tokens_per_s=tokens_per_s,
            tokens_per_s_per_gpu=per_gpu, mfu=mfu, peak=self.peak_name, peak_flops=self.peak_flops,
            step_time_s=step_time, elapsed_s=now - self.start_time, time=time.time(),
            mem_gib=peak_memory_gib(self.device), data_wait_s=data_wait_s / steps,
            data_wait_frac=data_wait_s / steps / step_time, checkpoint_s=checkpoint_s,
            val_loss=validation.loss if validation else None, val_s=val_s,
            **{k: v for k, v in (preference or {}).items() if k != "loss"},
        )
        if self.enabled:
            with open(self.path, "a") as f:  # one open per log: a crash leaves only whole lines
                f.write(row.to_json() + "\n")
                f.flush()
            for sink in self.sinks:
                sink.write(row)
            mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a"
            print(f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s "
                  f"| {step_time:.3f} s/step | data {row.data_wait_s:.3f} s/step ({row.data_wait_frac:.0%}) "
                  f"| mfu {mfu_text} ({self.peak_name}) | {row.mem_gib:.2f} GiB"
                  + (f" | val loss {validation.loss:.4f} ({validation.tokens:,} tokens, {val_s:.1f} s)"
                     if validation else "")
                  + (f" | reward acc {row.reward_accuracy:.2f} margin {row.reward_margin:.4f}"
                     if row.reward_accuracy is not None else ""), flush=True)
        return row

    def close(self) -> None:
        """Flush and close the sinks (a wandb run is finished: its offline files are then complete)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []
