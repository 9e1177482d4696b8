"""The `llamajobs` command: one module per command group, each command a few lines (parse the flags,
call one operation of llamajobs/ops.py, print it with llamajobs/views.py); main() is the error
boundary.

torch and transformers are imported only by the commands that need them, so `--help`, `render`,
`estimate` and `status` start fast.
"""

from __future__ import annotations

import os
import sqlite3
import sys

import click

from llamajobs.cli import data, estimate, jobs, models, status, sweep
from llamajobs.errors import Failure, SpecError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="llamajobs")
def cli() -> None:
    """Fine-tune LLaMA-family models on SLURM clusters: render, submit, watch, estimate.

    Run directories (the truth about every job) live under $LLAMAJOBS_HOME/runs unless --runs-dir or
    $LLAMAJOBS_RUNS says otherwise; on a cluster they must be on the shared filesystem. The site
    profile is $LLAMAJOBS_HOME/site.yaml (default ~/.llamajobs).
    """


for command in (jobs.submit, jobs.presets, status.status, jobs.cancel, jobs.requeue, jobs.logs, status.plot,
                jobs.render, estimate.estimate, data.data, data.tokenizer, models.convert, models.evaluate,
                models.generate, sweep.sweep_group):
    cli.add_command(command)


def fail(message: str, code: int) -> None:
    """One line on stderr and the exit code: 2 for bad input, 1 for a failed operation."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except SpecError as e:
        fail(str(e), 2)
    except Failure as e:
        fail(str(e), 1)
    except UnicodeDecodeError as e:  # a file of ours (or the user's) that is not UTF-8 text
        fail(f"a file is not UTF-8 text ({e.reason} at byte {e.start}); is it the file you meant?", 2)
    except OSError as e:  # the filesystem refused: permissions, a full disk, a path that is a file
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), 1)
    except sqlite3.DatabaseError as e:  # the registry's index is damaged; it is rebuilt from the runs
        fail(f"the job index is damaged ({e}); delete it under $XDG_CACHE_HOME/llamajobs to rebuild it", 1)
    except Exception as e:  # a bug: one line, and the traceback when asked for
        if os.environ.get("LLAMAJOBS_DEBUG"):
            raise
        fail(f"internal error, {type(e).__name__}: {e} (set LLAMAJOBS_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":
    main()
