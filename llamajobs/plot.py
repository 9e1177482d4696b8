"""`llamajobs plot`: loss, throughput and MFU against step, one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

from llamajobs.errors import Failure
from llamajobs.metrics import MetricsRow

matplotlib.use("Agg")  # no display on login nodes
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


X_LABELS = {"step": "optimizer step", "tokens": "tokens trained on"}


def plot_metrics(rows: list[MetricsRow], title: str, out: Path, x: str = "step") -> Path:
    if not rows:
        raise Failure("no metrics logged yet: nothing to plot")
    steps = [getattr(r, x) for r in rows]
    fig, (ax_loss, ax_tps, ax_mfu) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax_loss.plot(steps, [r.loss if math.isfinite(r.loss) else math.nan for r in rows], color="tab:blue")
    validated = [r for r in rows if r.val_loss is not None]
    if validated:
        ax_loss.plot([getattr(r, x) for r in validated], [r.val_loss for r in validated], color="tab:orange", marker="o",
                     label="validation (eval split)")
        ax_loss.plot([], [], color="tab:blue", label="training")
        ax_loss.legend()
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("training and validation loss" if validated else "training loss")
    ax_tps.plot(steps, [r.tokens_per_s for r in rows], color="tab:green", label="total")
    ax_tps.plot(steps, [r.tokens_per_s_per_gpu for r in rows], color="tab:olive", label="per worker (GPU)")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_title("throughput")
    ax_tps.legend()
    ax_mfu.plot(steps, [100 * r.mfu if r.mfu is not None else math.nan for r in rows], color="tab:red")
    ax_mfu.set_ylabel("MFU (%)")
    ax_mfu.set_title(f"model FLOPs utilisation against the {rows[-1].peak or 'unknown'} peak")
    ax_mfu.set_xlabel(X_LABELS[x])
    for ax in (ax_loss, ax_tps, ax_mfu):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out)


def overlay(curves: list[tuple[str, list[MetricsRow]]], title: str, out: Path, x: str = "step") -> Path:
    """Several runs' training loss (solid) and validation loss (dashed, dots) on one axes, one colour
    and one legend entry per run: which converges faster, against step or tokens."""
    empty = [label for label, rows in curves if not rows]
    if len(empty) == len(curves):
        raise Failure("no metrics logged yet by any of them: nothing to plot")
    fig, ax = plt.subplots(figsize=(10, 6))
    validated_any = any(r.val_loss is not None for _, rows in curves for r in rows)
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (label, rows) in enumerate(curves):
        colour = colours(i % colours.N)
        ax.plot([getattr(r, x) for r in rows], [r.loss if math.isfinite(r.loss) else math.nan for r in rows],
                color=colour, label=label + (" (no metrics yet)" if not rows else ""))
        validated = [r for r in rows if r.val_loss is not None]
        if validated:
            ax.plot([getattr(r, x) for r in validated], [r.val_loss for r in validated], color=colour,
                    linestyle="--", marker="o", markersize=3)
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title + ("\nsolid: training loss, dashed: validation loss" if validated_any else "\ntraining loss"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    try:
        fig.savefig(out, dpi=100, format="png")
    except OSError as e:
        raise Failure(f"-o {out}: cannot be written ({e.strerror})") from None
    finally:
        plt.close(fig)
    return out
