import subprocess

import pytest

from llamajobs import render, spec
from llamajobs.site import Site
from tests import golden


@pytest.mark.parametrize("preset", sorted(golden.PRESETS))
def test_golden_scripts_match_a_fresh_render(preset, tmp_path):
    committed = golden.ROOT / preset
    for path in golden.render_preset(preset, tmp_path):
        reference = committed / path.name
        assert reference.exists(), f"{reference} is missing; run `make golden` and commit it"
        assert path.read_text() == reference.read_text(), f"{reference} drifted; run `make golden` if deliberate"


def test_rendered_scripts_are_valid_bash(tmp_path):
    for path in golden.render_preset("7b-full-fsdp", tmp_path):
        if path.suffix in (".sh", ".sbatch"):
            subprocess.run(["bash", "-n", str(path)], check=True)


def test_hostile_values_stay_data(tmp_path):
    """A run dir, interpreter and partition with spaces, quotes and $() must reach the shell as data."""
    run_dir = tmp_path / "it's a $(touch pwned) dir"
    site = Site(python=str(tmp_path / "my `python`"), env=("WANDB_API_KEY",))
    s = spec.build({"cluster": "slurm", "partition": "gpu; rm -rf /"})
    render.render(s, site, run_dir)
    script = (run_dir / "launch.sh").read_text()
    # Only evaluate the assignments: the rest of the script would start torchrun.
    lines = [line for line in script.splitlines() if line.startswith("RUN_DIR=")]
    probe = "\n".join(lines + ['printf "%s\\n" "$RUN_DIR"'])
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert result.stdout.splitlines() == [str(run_dir)]
    assert not (tmp_path / "pwned").exists()
    assert "exec '" + str(tmp_path) + "/my `python`' -m torch.distributed.run" in script
    assert "export WANDB_API_KEY\n" in script
    assert "#SBATCH --partition='gpu; rm -rf /'" in (run_dir / "job.sbatch").read_text()


def test_spec_json_is_the_spec(tmp_path):
    s = spec.build({"size": "7b", "mode": "lora", "cluster": "slurm"})
    render.render(s, Site(), tmp_path)
    assert spec.JobSpec.load(tmp_path / "spec.json") == s


def test_procs_per_node_follow_the_node_unless_given(tmp_path):
    render.render(spec.build({"cluster": "slurm"}), Site(), tmp_path / "auto")
    assert "nvidia-smi -L" in (tmp_path / "auto" / "launch.sh").read_text()
    render.render(spec.build({"cluster": "slurm", "procs_per_node": 4, "global_batch": 16}), Site(), tmp_path / "four")
    assert "PROCS=4\n" in (tmp_path / "four" / "launch.sh").read_text()
