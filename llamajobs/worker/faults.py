"""Fault injection for tests: LLAMAJOBS_INJECT_FAULT=crash:N, oom:N or stop:N.

crash:N  every rank raises when optimizer step N starts (a crashing worker must end up FAILED and a
         relaunch must resume from the last checkpoint).
oom:N    every rank raises torch's out-of-memory error when step N starts (status must say
         OUT_OF_MEMORY with advice).
stop:N   rank 0 writes RUN_DIR/stop-request at the boundary after step N, so the worker takes the
         real preemption path (checkpoint, exit 0 without final/) at a step a test can predict.
"""

from __future__ import annotations

import os

KINDS = ("crash", "oom", "stop")


def injected_fault(kind: str) -> int | None:
    """The step of the injected fault of this kind, or None."""
    value = os.environ.get("LLAMAJOBS_INJECT_FAULT", "")
    if not value:
        return None
    name, _, step = value.partition(":")
    if name not in KINDS or not step.isdigit():
        raise ValueError(f"LLAMAJOBS_INJECT_FAULT={value!r}: expected crash:N, oom:N or stop:N")
    return int(step) if name == kind else None
