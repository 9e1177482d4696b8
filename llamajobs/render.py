"""Render templates/ into a run dir: spec.json, the per-node launch.sh and a standalone job.sbatch."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import jinja2

from llamajobs import __version__
from llamajobs.errors import SpecError
from llamajobs.site import Site
from llamajobs.spec import JobSpec

RENDERED = ("spec.json", "launch.sh", "job.sbatch")


def templates_dir() -> Path:
    # A wheel carries templates/ inside the package; a source checkout has it at the top level.
    packaged = Path(__file__).parent / "templates"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "templates"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # Every value that reaches a shell goes through this filter: a path with a space or a quote in
    # a job name must not become shell syntax.
    env.filters["shell"] = lambda value: shlex.quote(str(value))
    return env


def sbatch_options(spec: JobSpec) -> list[tuple[str, str]]:
    """The #SBATCH options that come straight from the spec, in a stable order."""
    values = {
        "partition": spec.partition, "account": spec.account, "qos": spec.qos, "time": spec.time,
        "constraint": spec.constraint, "exclude": spec.exclude, "mail-user": spec.mail_user,
        "mail-type": spec.mail_type,
    }
    return [(k, v) for k, v in values.items() if v]


def render(spec: JobSpec, site: Site, out_dir: str | Path, run_dir: str | None = None) -> list[Path]:
    """Write the rendered files into out_dir; `run_dir` is where they will live when it differs."""
    out = Path(out_dir)
    for what, value in (("run dir", run_dir or str(out.absolute())), ("site python", site.python or "")):
        if any(c in value for c in "\n\r\0"):
            raise SpecError(f"{what} {value!r} contains a line break or NUL; scripts cannot carry it safely")
    out.mkdir(parents=True, exist_ok=True)
    context = {
        "spec": spec,
        "site": site,
        "run_dir": run_dir or str(out.absolute()),
        "python": site.python or sys.executable,
        "container": site.container + " " if site.container else "",
        "version": __version__,
        "sbatch_options": sbatch_options(spec),
    }
    env = _environment()
    written = []
    for name in RENDERED:
        text = spec.to_json() if name == "spec.json" else env.get_template(name + ".j2").render(context)
        path = out / name
        path.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            os.chmod(path, 0o755)
        written.append(path)
    return written
