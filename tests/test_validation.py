"""Validation's parts, in process: when it runs, the row that carries it, what status reads back.
(tests/test_chat_run.py runs it end to end in a job.)"""

from __future__ import annotations

import json
import time

import torch

from llamajobs import metrics, monitor
from llamajobs.spec import JobSpec
from llamajobs.worker.metrics import MetricsLogger
from llamajobs.worker.parallel import Dist, Fsdp
from llamajobs.worker.validate import Validation, Validator, eval_stream

CPU = Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def test_due_every_n_steps_and_at_the_last_and_never_without_an_eval_split():
    validator = Validator(object(), every=3, total=10, micro_batch=1, env=CPU, strategy=Fsdp(JobSpec(), None))
    assert [s for s in range(1, 11) if validator.due(s)] == [3, 6, 9, 10]
    at_end = Validator(object(), every=None, total=10, micro_batch=1, env=CPU, strategy=Fsdp(JobSpec(), None))
    assert [s for s in range(1, 11) if at_end.due(s)] == [10]
    none = Validator(None, every=3, total=10, micro_batch=1, env=CPU, strategy=Fsdp(JobSpec(), None))
    assert not any(none.due(s) for s in range(1, 11))
    assert eval_stream(JobSpec(), None, pad_id=2) is None  # no --data: the sample corpus has no eval split


def test_the_row_carries_val_loss_and_its_time_is_not_step_time(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=4, steps_per_epoch=4, tokens_per_step=100,
                           flops_per_token=1.0, world_size=1, device=torch.device("cpu"))
    plain = logger.log(1, 2.0, 1e-3, 1.0)
    time.sleep(0.2)
    validated = logger.log(2, 1.5, 1e-3, 1.0, validation=Validation(loss=1.25, tokens=50, seconds=0.2))
    assert plain.val_loss is None and validated.val_loss == 1.25 and validated.val_s == 0.2
    assert validated.step_time_s < 0.1  # the 0.2 s of validation is left out
    rows = metrics.read(tmp_path).rows
    assert [r.val_loss for r in rows] == [None, 1.25]
    assert json.loads((tmp_path / metrics.METRICS_FILE).read_text().splitlines()[0])["val_loss"] is None
    assert monitor.latest_val_loss(rows) == 1.25 and monitor.latest_val_loss(rows[:1]) is None
