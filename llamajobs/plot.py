"""`llamajobs plot`: loss, throughput and MFU against step, one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamajobs.errors import Failure


def plot_metrics(metrics: list[dict[str, Any]], title: str, out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise Failure("plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display on login nodes
    import matplotlib.pyplot as plt

    if not metrics:
        raise Failure("no metrics logged yet: nothing to plot")
    steps = [m["step"] for m in metrics]
    fig, (ax_loss, ax_tps, ax_mfu) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax_loss.plot(steps, [m["loss"] for m in metrics], color="tab:blue")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("training loss")
    ax_tps.plot(steps, [m["tokens_per_s"] for m in metrics], color="tab:green", label="total")
    ax_tps.plot(steps, [m["tokens_per_s_per_gpu"] for m in metrics], color="tab:olive", label="per worker (GPU)")
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_title("throughput")
    ax_tps.legend()
    ax_mfu.plot(steps, [100 * (m.get("mfu") or 0) for m in metrics], color="tab:red")
    ax_mfu.set_ylabel("MFU (%)")
    ax_mfu.set_title(f"model FLOPs utilisation against the {metrics[-1].get('peak') or 'unknown'} peak")
    ax_mfu.set_xlabel("optimizer step")
    for ax in (ax_loss, ax_tps, ax_mfu):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
