"""The rendered launch on nodes a one-host cluster cannot show: real bash, faked scontrol and python.

The fakes sit at the subprocess boundary only: the script's own logic (head, node rank, port,
processes, hostfile) runs for real.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import submitit

from llamajobs import render, spec
from llamajobs.site import Site

NODELIST = "gpu[003-004,010]"
HOSTS = ["gpu003", "gpu004", "gpu010"]


def fake_bin(tmp_path: Path) -> Path:
    """scontrol that expands NODELIST and knows each node's address (addr-of-NAME), and a python
    that records its arguments instead of training."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n[ \"$3\" = '{NODELIST}' ] && printf '%s\\n' {' '.join(HOSTS)}\n"
                                      '[ "$2" = node ] && echo "NodeName=$3 Arch=x86_64 NodeAddr=addr-of-$3 State=IDLE"\n'
                                      "exit 0\n")
    (bin_dir / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")  # a CPU-only node
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_launch(tmp_path: Path, s: spec.JobSpec, node_id: int, extra_env: dict[str, str] | None = None) -> list[str]:
    bin_dir = fake_bin(tmp_path)
    run_dir = tmp_path / "run"
    render.render(s, Site(python=str(bin_dir / "python")), run_dir)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": NODELIST, "SLURM_NNODES": "3",
           "SLURM_NODEID": str(node_id), "SLURM_JOB_ID": "12345", "SLURM_CPUS_PER_TASK": "16",
           "ARGS_OUT": str(tmp_path / "args"), "TMPDIR": str(tmp_path), **(extra_env or {})}
    subprocess.run(["bash", str(run_dir / "launch.sh")], env=env, check=True, capture_output=True, text=True)
    return (tmp_path / "args").read_text().splitlines()


def arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


THREE_NODES = {"cluster": "slurm", "nodes": 3, "procs_per_node": 2, "global_batch": 48}


@pytest.mark.parametrize("node_id", [0, 2])
def test_torchrun_rendezvous_is_resolved_on_the_node(tmp_path, node_id):
    args = run_launch(tmp_path, spec.build(THREE_NODES), node_id)
    assert args[:2] == ["-m", "torch.distributed.run"]
    # gpu003 does not resolve on this host: its address comes from the controller
    assert arg(args, "--master-addr") == "addr-of-gpu003"
    assert arg(args, "--node-rank") == str(node_id)
    assert arg(args, "--nnodes") == "3" and arg(args, "--nproc-per-node") == "2"
    assert arg(args, "--master-port") == str(20000 + 12345 % 20000)
    assert arg(args, "--max-restarts") == "0"
    assert args[-2:] == ["llamajobs.worker", str(tmp_path / "run")]


def test_the_node_launcher_passes_the_hosts_submitit_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_JOB_NODELIST", NODELIST)
    hosts = submitit.JobEnvironment().hostnames
    assert hosts == HOSTS
    # Given the hosts, the script needs no scontrol: a first host other than scontrol's wins.
    args = run_launch(tmp_path, spec.build(THREE_NODES), 1, {"LLAMAJOBS_HOSTS": "gpu010 gpu003 gpu004"})
    assert arg(args, "--master-addr") == "addr-of-gpu010"
    # A head whose name resolves is used as named.
    args = run_launch(tmp_path / "b", spec.build(THREE_NODES), 1, {"LLAMAJOBS_HOSTS": "localhost gpu003 gpu004"})
    assert arg(args, "--master-addr") == "localhost"


def test_processes_follow_the_gpus_of_the_node(tmp_path):
    s = spec.build({"cluster": "slurm", "nodes": 3, "global_batch": 96})
    bin_dir = fake_bin(tmp_path)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: H100\"; done\n")
    args = run_launch(tmp_path / "a", s, 0, {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert arg(args, "--nproc-per-node") == "4"
    args = run_launch(tmp_path / "b", s, 0, {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert arg(args, "--nproc-per-node") == "8"


def test_deepspeed_launcher_runs_inside_the_step_without_ssh(tmp_path):
    s = spec.build({**THREE_NODES, "strategy": "ds-zero3", "launcher": "deepspeed"})
    args = run_launch(tmp_path, s, 2)
    assert args[:3] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert "--no_ssh" in args and arg(args, "--node_rank") == "2" and arg(args, "--master_addr") == "addr-of-gpu003"
    hostfile = Path(arg(args, "--hostfile")).read_text().splitlines()
    assert hostfile == [f"{h} slots=2" for h in HOSTS]


def test_node_count_lives_in_the_batch_script_only(tmp_path):
    for nodes in (2, 16):
        s = spec.build({"size": "7b", "cluster": "slurm", "nodes": nodes, "gpus_per_node": 8, "global_batch": 512})
        render.render(s, Site(), tmp_path / str(nodes), run_dir="/runs/1")
        sbatch = (tmp_path / str(nodes) / "job.sbatch").read_text()
        assert f"#SBATCH --nodes={nodes}\n" in sbatch and "#SBATCH --ntasks-per-node=1\n" in sbatch
        assert "#SBATCH --gres=gpu:8\n" in sbatch and "#SBATCH --cpus-per-task=32\n" in sbatch
    assert (tmp_path / "2" / "launch.sh").read_text() == (tmp_path / "16" / "launch.sh").read_text()
