"""The golden files under sbatch/: every preset (llamajobs/presets/*.yaml) rendered, one folder each.

`make golden` rewrites them after a deliberate template or preset change; tests/test_render.py fails
when a re-render differs, a file is missing, or a folder has no preset. A preset naming a Hub model
renders as planned offline (presets.offline): at the catalog's shape for its size, the id not resolved.
"""

from __future__ import annotations

from pathlib import Path

from llamajobs import presets, render, spec
from llamajobs.site import Site

ROOT = Path(__file__).resolve().parent.parent / "sbatch"

# What a typical site profile says; the scripts show where those lines land.
SITE = Site(setup=("module load cuda/12.1", "source /shared/venvs/llamajobs/bin/activate"), python="python",
            socket_ifname="ib0", env=("WANDB_API_KEY", "HF_TOKEN"))
SITE_DEFAULTS = {"partition": "gpu"}

PRESETS = presets.names()


def preset_spec(name: str) -> spec.JobSpec:
    """The preset as `llamajobs render --config NAME` builds it on a SLURM site with SITE_DEFAULTS."""
    return spec.build({"cluster": "slurm"}, presets.offline(presets.settings(name)), SITE_DEFAULTS)


def render_preset(name: str, out_dir: Path) -> list[Path]:
    return render.render(preset_spec(name), SITE, out_dir, run_dir=f"/shared/llamajobs/runs/1-{name}")


if __name__ == "__main__":
    for preset in PRESETS:
        for path in render_preset(preset, ROOT / preset):
            print(path)
