import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from llamajobs.catalog import CLUSTERS, FAMILIES, KERNELS, MODES, SIZES, STRATEGIES, TASKS
from llamajobs.cli import cli as root
from llamajobs.values import DEVICES

SURFACE_FILE = Path(__file__).with_name("cli_surface.json")


def surface(command: click.Command, prefix: str = "llamajobs") -> dict[str, list[str]]:
    found = {prefix: sorted(opt for p in command.params for opt in (p.opts + p.secondary_opts)
                            if isinstance(p, click.Option)) + sorted(p.name.upper() for p in command.params
                                                                     if isinstance(p, click.Argument))}
    for name, sub in getattr(command, "commands", {}).items():
        found.update(surface(sub, f"{prefix} {name}"))
    return found


def test_cli_surface_is_frozen():
    """A rename or removal of a command or flag must be deliberate: update cli_surface.json with it."""
    assert surface(root) == json.loads(SURFACE_FILE.read_text())


def test_fixed_values_are_offered_from_their_registries():
    """--help lists a flag's values from the registry that validates them (never typed by hand), and
    shell completion offers them; a value outside them is refused by the spec, as from a run YAML."""
    from llamajobs.data.chat import TEMPLATES
    from llamajobs.data.formats import FORMATS

    def choices(command: click.Command) -> dict[str, list[str]]:
        return {p.name: list(p.type.choices) for p in command.params if isinstance(p.type, click.Choice)}

    submit = choices(root.commands["submit"])
    assert (submit["size"], submit["strategy"], submit["mode"]) == (list(SIZES), list(STRATEGIES), list(MODES))
    assert (submit["kernels"], submit["cluster"], submit["device"]) == (list(KERNELS), list(CLUSTERS), list(DEVICES))
    prepare = choices(root.commands["data"].commands["prepare"])
    assert (prepare["fmt"], prepare["chat_template"]) == (list(FORMATS), list(TEMPLATES))
    assert choices(root.commands["eval"])["task"] == list(TASKS)
    model_path = next(p for p in root.commands["submit"].params if p.name == "model_path")
    assert all(family in model_path.help for family in FAMILIES)


@pytest.mark.parametrize("args, message", [
    (["submit", "--size", "8b", "--cluster", "local"], "--size '8b' is not known"),
    (["submit", "--strategy", "zero4", "--cluster", "local"], "--strategy 'zero4' is not allowed"),
    (["submit", "--global-batch", "7", "--cluster", "local"], "--global-batch 7 is not divisible"),
    (["render", "--out", "x", "--time", "forever"], "--time 'forever' is malformed"),
    (["estimate", "hours", "--size", "7b", "--gpu", "v100"], "--gpu 'v100' is not known"),
    (["estimate", "hours", "--size", "7b", "--tokens", "lots"], "--tokens 'lots' is not a count"),
    (["status", "99"], "JOB 99 is not known"),
    (["submit", "--nodes", "two"], "'two' is not a valid integer"),
])
def test_bad_input_is_one_line_and_exit_2(cli, args, message):
    code, stdout, stderr = cli(*args)
    assert code == 2, stderr
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert stdout == ""


def test_bad_input_leaves_nothing_behind(cli, home):
    code, _, _ = cli("submit", "--cluster", "local", "--global-batch", "7")
    assert code == 2
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_config_file_and_flags(cli, home, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("size: 7b\nseq-len: 1024\nmicro_batch: 2\n")
    home.mkdir(parents=True)
    (home / "site.yaml").write_text("partition: big\nsetup: [module load cuda]\ntime: '12:00:00'\n")
    code, stdout, stderr = cli("render", "--config", str(config), "--seq-len", "2048", "--out", str(tmp_path / "r"))
    assert code == 0, stderr
    s = json.loads((tmp_path / "r" / "spec.json").read_text())
    assert (s["size"], s["seq_len"], s["micro_batch"], s["partition"], s["time"]) == ("7b", 2048, 2, "big", "12:00:00")
    assert "module load cuda" in (tmp_path / "r" / "launch.sh").read_text()


def test_estimate_json_keys(cli):
    code, stdout, _ = cli("estimate", "hours", "--size", "7b", "--strategy", "fsdp", "--nodes", "1",
                          "--gpus-per-node", "8", "--gpu", "a100-80g", "--tokens", "2.5B", "--json")
    assert code == 0
    result = json.loads(stdout)
    assert {"hours_per_epoch", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "gpu_mem_gib", "cpu_mem_gib",
            "fits"} <= set(result)
    assert 10 < result["hours_per_epoch"] < 200  # 2.5B tokens of 7B on 8xA100: tens of hours
    code, stdout, _ = cli("estimate", "memory", "--size", "13b", "--gpu", "a100-40g", "--json")
    result = json.loads(stdout)
    assert {r["strategy"] for r in result["strategies"]} >= {"fsdp", "ds-zero3-offload"}
    assert {r["verdict"] for r in result["strategies"]} <= {"fits", "tight", "does not fit"}


def test_light_commands_do_not_import_torch(tmp_path, home):
    """--help, render, estimate and status must start fast: no torch, no transformers."""
    probe = (
        "import sys\n"
        "from llamajobs.cli import main\n"
        "for args in (['--help'], ['render', '--size', '7b', '--out', sys.argv[1]],\n"
        "             ['estimate', 'hours', '--size', '7b', '--tokens', '1B'], ['status']):\n"
        "    sys.argv = ['llamajobs', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, (args, e.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft', 'submitit') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_every_settable_field_has_a_flag_or_is_listed_as_run_yaml_only():
    """A JobSpec field a user sets is a submit flag, unless spec.py says it is given in a run YAML or
    site profile only (YAML_ONLY), resolved at submit (RESOLVED) or recorded by a command (RECORDED)."""
    from llamajobs import spec as spec_mod
    from llamajobs.cli import jobs

    flags = {p.name for p in jobs.submit.params}
    listed = spec_mod.YAML_ONLY | spec_mod.RESOLVED | spec_mod.RECORDED
    assert [f for f in spec_mod.FIELDS if f not in flags and f not in listed] == []
    assert [f for f in listed if f in flags] == []  # a listed field that gained a flag leaves the lists
