"""Render templates/ into a run dir: spec.json, the per-node launch.sh, a standalone job.sbatch, and
for the DeepSpeed strategies ds_config.json (the dict the worker builds, worker/zero_config.py)."""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path

import jinja2

from llamajobs import __version__, control
from llamajobs.site import Site
from llamajobs.spec import JobSpec
from llamajobs.values import check_text
from llamajobs.worker.zero_config import DS_CONFIG, ds_config

RENDERED = ("spec.json", "launch.sh", "job.sbatch")


def templates_dir() -> Path:
    # A wheel carries templates/ inside the package; a source checkout has it at the top level.
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


@functools.cache  # one environment: its templates are compiled once per process
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # Every value that reaches a shell goes through one of these filters: a path with a space or a
    # quote in a job name must not become shell syntax. `shell` keeps the value literal; `expand` (the
    # site's cache_dir only) double-quotes it so that its $VARIABLES expand on the node and nothing else.
    env.filters["shell"] = lambda value: shlex.quote(str(value))
    env.filters["expand"] = lambda value: '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return env


def sbatch_options(spec: JobSpec) -> list[tuple[str, str]]:
    """The #SBATCH options that come straight from the spec, in a stable order."""
    values = {
        "partition": spec.partition, "account": spec.account, "qos": spec.qos, "time": spec.time,
        "constraint": spec.constraint, "exclude": spec.exclude, "mail-user": spec.mail_user,
        "mail-type": spec.mail_type,
    }
    return [(k, v) for k, v in values.items() if v]


def gres(spec: JobSpec, site: Site) -> str | None:
    """The job's --gres: GPUs asked per node on a cluster that allocates them, unless --device cpu."""
    return site.gres_for(spec.gpus_per_node) if spec.cluster_info.allocates_gpus and spec.device != "cpu" else None


def render(spec: JobSpec, site: Site, out_dir: str | Path, run_dir: str | None = None) -> list[Path]:
    """Write the rendered files into out_dir; `run_dir` is where they will live when it differs."""
    out = Path(out_dir)
    check_text("run dir", run_dir or str(out.absolute()))  # (the spec and the site checked their own values)
    out.mkdir(parents=True, exist_ok=True)
    context = {
        "spec": spec,
        "site": site,
        "run_dir": run_dir or str(out.absolute()),
        "python": site.python or sys.executable,
        # The container command as words, each quoted: data, whatever its paths hold.
        "container": "".join(shlex.quote(word) + " " for word in shlex.split(site.container or "")),
        "version": __version__,
        "sbatch_options": sbatch_options(spec),
        "gres": gres(spec, site),
        "exclude": site.excluded(spec.exclude),  # --exclude and the site's keep_out nodes
        "signal_delay_s": control.signal_delay_s(spec),
        "stop_wait_s": control.stop_wait_s(spec),
        # What the job runs is the spec's to say: training, or an eval (`llamajobs eval --cluster`).
        "worker_module": "llamajobs.worker" if spec.evaluation is None else "llamajobs.worker.evaluate",
    }
    env = _environment()
    written = []
    for name in RENDERED + ((DS_CONFIG,) if spec.strategy_info.deepspeed else ()):
        if name == DS_CONFIG:
            text = json.dumps(ds_config(spec), indent=2) + "\n"
        else:
            text = spec.to_json() if name == "spec.json" else env.get_template(name + ".j2").render(context)
        path = out / name
        path.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            os.chmod(path, 0o755)
        written.append(path)
    return written
