"""The preset configurations whose rendered scripts are committed under sbatch/ (golden files).

`make golden` rewrites them after a deliberate template change; tests/test_render.py fails when a
re-render differs or a file is missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llamajobs import render, spec
from llamajobs.site import Site

ROOT = Path(__file__).resolve().parent.parent / "sbatch"

# What a typical site profile says; the scripts show where those lines land.
SITE = Site(setup=("module load cuda/12.1", "source /shared/venvs/llamajobs/bin/activate"), python="python",
            socket_ifname="ib0", env=("WANDB_API_KEY", "HF_TOKEN"))


def llama7b_fsdp() -> spec.JobSpec:
    return spec.build({"size": "7b", "strategy": "fsdp", "cluster": "slurm", "nodes": 2, "gpus_per_node": 8,
                       "partition": "gpu", "time": "48:00:00", "activation_checkpointing": True, "cpus_per_node": 64,
                       "tokens_per_epoch": "2.5B"})


def llama7b_lora_fsdp() -> spec.JobSpec:
    return spec.build({"size": "7b", "strategy": "fsdp", "mode": "lora", "cluster": "slurm", "nodes": 1,
                       "gpus_per_node": 8, "partition": "gpu", "time": "24:00:00", "lr": 2e-4})


def llama7b_zero2_offload() -> spec.JobSpec:
    """The seed's "DS(Opt)": ZeRO-2 with the optimizer on the CPU."""
    return spec.build({"size": "7b", "strategy": "ds-zero2-offload", "cluster": "slurm", "nodes": 1, "gpus_per_node": 8,
                       "partition": "gpu", "time": "48:00:00", "activation_checkpointing": True, "cpus_per_node": 64})


def llama7b_zero3_offload() -> spec.JobSpec:
    """The seed's "DS(Opt&Par)": ZeRO-3 with optimizer and parameters on the CPU."""
    return dataclasses.replace(llama7b_zero2_offload(), strategy="ds-zero3-offload")


def llama13b_zero3_offload() -> spec.JobSpec:
    """What the seed's 13B run needed to fit."""
    return dataclasses.replace(llama7b_zero3_offload(), size="13b", time="72:00:00")


PRESETS = {"7b-full-fsdp": llama7b_fsdp, "7b-lora-fsdp": llama7b_lora_fsdp,
           "7b-full-ds-zero2-offload": llama7b_zero2_offload, "7b-full-ds-zero3-offload": llama7b_zero3_offload,
           "13b-full-ds-zero3-offload": llama13b_zero3_offload}


def render_preset(name: str, out_dir: Path) -> list[Path]:
    return render.render(PRESETS[name](), SITE, out_dir, run_dir=f"/shared/llamajobs/runs/1-{name}")


if __name__ == "__main__":
    for preset in PRESETS:
        for path in render_preset(preset, ROOT / preset):
            print(path)
