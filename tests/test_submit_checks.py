"""What submit refuses or warns about before anything is queued (issue 28): recorded fields given as
settings, a local run that cannot fit this host, --fp8 on a host without a GPU, more GPUs per node
than the partition's nodes have, a GraceTime warning sized from the checkpoint's bytes, no --gres
off SLURM; and a bare `estimate hours`. SLURM is faked at the subprocess boundary."""

from __future__ import annotations

import json
import subprocess

import pytest

from llamajobs import cluster, control, ops, render, spec, submit
from llamajobs.cluster import local, slurm
from llamajobs.errors import SpecError
from llamajobs.site import Site


class FakeSlurm:
    """subprocess.run for SLURM's commands: canned (code, stdout, stderr) by command name; a command
    not given is missing (exit 127 through slurm._run)."""

    def __init__(self, **answers: tuple[int, str, str]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        self.calls.append(list(command))
        if command[0] not in self.answers:
            raise FileNotFoundError(2, "No such file or directory", command[0])
        return subprocess.CompletedProcess(command, *self.answers[command[0]])


def one_line(stderr: str) -> str:
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    return stderr.strip()


# --- recorded fields are not settings ---


@pytest.mark.parametrize("key, value", [("evaluation", {"model": "/m", "task": "medqa", "data": "/d.jsonl"}),
                                        ("micro_batch_auto", True), ("micro-batch-auto", False),
                                        ("sharded_accumulation", True)])
def test_recorded_fields_are_refused_in_a_run_yaml_and_the_site_profile(key, value, cli, home, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({key: value}))  # (JSON is YAML)
    code, stdout, stderr = cli("render", "--config", str(config), "--out", str(tmp_path / "r"))
    assert code == 2 and stdout == ""
    assert one_line(stderr).startswith(f"Error: --config: unknown key '{key}'; allowed: ")
    assert "evaluation" not in stderr.split("allowed:")[1] and "sharded-accumulation" not in stderr
    home.mkdir(parents=True, exist_ok=True)
    (home / "site.yaml").write_text(json.dumps({key: value}))
    code, _, stderr = cli("render", "--out", str(tmp_path / "r"))
    assert code == 2 and f"site profile: unknown key '{key}'" in one_line(stderr)
    assert not (tmp_path / "r").exists()


def test_the_eval_command_still_sets_evaluation_itself():
    options = spec.EvalSpec(model="/m", task="medqa", data="/d.jsonl")
    assert spec.build({"evaluation": options}).evaluation == options  # (flags: what the command sets)


# --- no --gres off SLURM ---


def test_the_local_cluster_asks_no_gres(tmp_path):
    local_spec = spec.build({"cluster": "local"})
    render.render(local_spec, Site(), tmp_path)
    assert "--gres" not in (tmp_path / "job.sbatch").read_text()
    assert submit.allocation(local_spec, Site()).gres is None
    assert submit.allocation(spec.build({"cluster": "slurm"}), Site()).gres == "gpu:8"


# --- the local cluster: this host is the node ---


@pytest.fixture
def small_host(monkeypatch):
    """A 24 GiB host without GPUs."""
    monkeypatch.setattr(local, "host_ram_gib", lambda: 24.0)
    monkeypatch.setattr(local, "host_gpus", lambda: 0)


def test_a_local_run_that_cannot_fit_this_hosts_ram_is_refused(small_host):
    big = spec.build({"size": "7b", "strategy": "fsdp", "cluster": "local"})
    with pytest.raises(SpecError) as e:
        ops.fit_check(big, None, no_controller=True)
    assert str(e.value).startswith("7b full with --strategy fsdp on the local cluster needs ~")
    assert str(e.value).endswith("GiB of RAM on this host (its node), which has 24 GiB; use --size tiny, --mode lora, "
                                 "a GPU cluster (--cluster slurm; none answered `scontrol ping` here), or --force "
                                 "to run anyway")
    assert ops.fit_check(big, None, force=True).warning is None
    assert "which has 24 GiB" in ops.fit_check(big, None, dry_run=True).warning
    lora = spec.build({"size": "7b", "mode": "lora", "cluster": "local"})
    with pytest.raises(SpecError, match="use --size tiny, a GPU cluster \\(--cluster slurm\\), or --force"):
        ops.fit_check(lora, None)
    assert ops.fit_check(spec.build({"cluster": "local"}), None) == ops.FitCheck(None, "")  # tiny fits


def test_bare_submit_without_a_controller_is_refused_before_anything_starts(cli, home, small_host, monkeypatch):
    monkeypatch.setattr(slurm.subprocess, "run", FakeSlurm())  # no scontrol: no controller answers
    code, stdout, stderr = cli("submit", "--size", "7b", "--strategy", "fsdp")
    assert code == 2 and stdout == ""
    assert "on the local cluster needs ~" in one_line(stderr) and "none answered `scontrol ping`" in stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_fp8_on_a_local_host_without_a_gpu_is_refused_at_submit(small_host, monkeypatch):
    fp8 = spec.build({"cluster": "local", "fp8": True, "compile": True})
    with pytest.raises(SpecError, match="--fp8 needs an H100-class GPU .*; this host, the local cluster's node, has "
                                        "no GPU: leave --fp8 out, or submit to --cluster slurm"):
        ops.fit_check(fp8, None, force=True)
    monkeypatch.setattr(local, "host_gpus", lambda: 1)
    assert ops.fit_check(fp8, None).spec == fp8


# --- SLURM: the partition's nodes and GraceTime ---


def test_more_gpus_per_node_than_the_partitions_nodes_have_names_the_value(monkeypatch):
    faked = FakeSlurm(sinfo=(0, "gpu:4(S:0)\ngpu:a100:8,shard:16\n(null)\n", ""))
    monkeypatch.setattr(slurm.subprocess, "run", faked)
    backend = cluster.backend("slurm")
    asked = spec.build({"cluster": "slurm", "gpus_per_node": 16, "partition": "gpu"})
    with pytest.raises(SpecError) as e:
        submit.check_node_gpus(asked, Site(), backend)
    assert str(e.value) == ("--gpus-per-node 16: the nodes of partition gpu have at most 8 GPUs each; give "
                            "--gpus-per-node 8 or fewer (more --nodes for more GPUs), or another --partition")
    assert faked.calls == [["sinfo", "-h", "-o", "%G", "-p", "gpu"]]
    submit.check_node_gpus(spec.build({"cluster": "slurm", "gpus_per_node": 8}), Site(), backend)  # fits
    submit.check_node_gpus(spec.build({"cluster": "slurm", "gpus_per_node": 16, "device": "cpu"}), Site(), backend)
    monkeypatch.setattr(slurm.subprocess, "run", FakeSlurm(sinfo=(1, "", "sinfo: error")))
    submit.check_node_gpus(asked, Site(), backend)  # sinfo cannot tell: sbatch decides


def test_a_dry_run_with_too_many_gpus_per_node_is_one_line(cli, home, monkeypatch):
    monkeypatch.setattr(slurm.subprocess, "run", FakeSlurm(sinfo=(0, "gpu:8\n", ""), scontrol=(0, "", "")))
    code, _, stderr = cli("submit", "--cluster", "slurm", "--gpus-per-node", "16", "--time", "1:00:00", "--dry-run")
    assert code == 2
    assert one_line(stderr) == ("Error: --gpus-per-node 16: the nodes of the default partition have at most 8 GPUs "
                                "each; give --gpus-per-node 8 or fewer (more --nodes for more GPUs), or another "
                                "--partition")


@pytest.mark.parametrize("text, gpus", [("gpu:8\n", 8), ("gpu:a100:4(S:0-1)\ngpu:h100:8\n", 8), ("(null)\n", None),
                                        ("gpu:2,shard:8\n", 2), ("", None), ("gpu:tesla:2(S:0),mps:100\n", 2)])
def test_node_gpus_from_sinfo(text, gpus):
    assert slurm.parse_node_gpus(text) == gpus


def test_the_grace_warning_is_sized_from_the_checkpoints_bytes():
    requeue = slurm.parse_partition("PartitionName=gpu Default=YES PreemptMode=REQUEUE GraceTime=20", None)
    tiny_lora = spec.build({"cluster": "slurm", "mode": "lora"})
    assert control.checkpoint_bytes(tiny_lora) < 1e6  # the adapter and its Adam state, not the model
    assert submit.grace_warning(tiny_lora, requeue) is None
    lora_7b = spec.build({"size": "7b", "cluster": "slurm", "mode": "lora"})
    assert 5e7 < control.checkpoint_bytes(lora_7b) < 2e8 and submit.grace_warning(lora_7b, requeue) is None
    full_7b = spec.build({"size": "7b", "cluster": "slurm"})
    assert "less than the ~108 s this job needs to save a checkpoint (107.8 GB)" in submit.grace_warning(full_7b,
                                                                                                      requeue)


# --- a bare `estimate hours` ---


def test_bare_estimate_hours_is_the_seeds_table(cli, home):
    code, stdout, stderr = cli("estimate", "hours", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    assert [(r["size"], r["strategy"]) for r in rows][:2] == [("7b", "fsdp"), ("7b", "fsdp-offload")]
    assert {r["size"] for r in rows} == {"7b", "13b"} and len(rows) == 2 * 7
    assert all(r["hours_per_epoch"] > 1 for r in rows)  # 2.5B tokens, not the tiny model's minutes
    assert one_line(stderr).startswith("7B and 13B x every strategy on 1 node x 8 a100-80g at 2.5B tokens per epoch "
                                       "(the seed's table)")


def test_bare_estimate_hours_uses_a_site_profile_that_names_its_gpu(cli, home):
    home.mkdir(parents=True)
    (home / "site.yaml").write_text("gpu: h100\ngpus_per_node: 4\nnodes: 2\n")
    code, stdout, stderr = cli("estimate", "hours")
    assert code == 0, stderr
    assert "on 2 nodes x 4 h100 at 2.5B tokens per epoch (your site profile's defaults)" in stderr
    assert "GPU: h100" in stdout and "13b" in stdout
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b", "--strategy", "fsdp", "--json")
    assert code == 0 and json.loads(stdout)["peak"] == "h100"  # the site's GPU is --gpu's default
    (home / "site.yaml").write_text("gpu: v100\n")
    code, _, stderr = cli("estimate", "hours")
    assert code == 2 and "gpu 'v100' is not known; choose one of" in one_line(stderr)
