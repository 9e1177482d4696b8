"""The eval worker: `python -m llamajobs.worker.evaluate RUN_DIR` under torchrun, for a job that
`llamajobs eval --cluster ...` submitted (spec.json's `evaluation` holds eval's settings).

Data parallel: every rank loads the whole model (an eval keeps no gradients or optimizer state, so
a model that one GPU can serve needs no sharding) and scores questions rank, rank + W, rank + 2W, ...
with the in-process eval's own functions. Rank 0 gathers the choices, puts them back in the file's
order and summarises them exactly as `llamajobs eval` does: RUN_DIR/eval.json holds what
`eval --json` prints, RUN_DIR/predictions.jsonl the per-question rows, and the "finished" event
carries the accuracy for `status`. An eval has no checkpoints: a requeued one starts over.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from llamajobs import evaluate as ev
from llamajobs import events
from llamajobs.spec import EvalSpec, JobSpec
from llamajobs.worker import parallel
from llamajobs.worker.checkpoint_files import write_atomically
from llamajobs.worker.metrics import device_description
from llamajobs.worker.parallel import Dist
from llamajobs.worker.train import parse_run_dir

RESULT = "eval.json"
PREDICTIONS = "predictions.jsonl"


@record  # torchrun then reports the failing rank's root-cause traceback, not just "exit code 1"
def main(argv: list[str] | None = None) -> int:
    run_dir = parse_run_dir(sys.argv[1:] if argv is None else argv)
    spec = JobSpec.load(run_dir / "spec.json")
    if spec.evaluation is None:
        raise SystemExit(f"{run_dir} holds a training run; its worker is `python -m llamajobs.worker`")
    env = parallel.init_distributed(spec)
    try:
        if spec.evaluation.harness:
            run_harness(run_dir, spec.evaluation, env)
        else:
            evaluate(run_dir, spec.evaluation, env)
    finally:
        parallel.teardown()
    return 0


def evaluate(run_dir: Path, options: EvalSpec, env: Dist) -> None:
    """Every rank scores its share; rank 0 writes the result. Every rank runs it."""
    inputs = ev.read_inputs(options)  # each rank reads the (small) file itself: nothing to broadcast
    model, tokenizer = ev.load_model(options.model, options.adapter, env.device.type)  # "cuda": this rank's GPU
    announce(run_dir, env, len(inputs.questions))
    dist.barrier()  # the clock starts when every rank holds its model, as the in-process one starts after loading
    started = time.perf_counter()
    share = inputs.questions[env.rank::env.world_size]
    scored = ev.score_questions(model, tokenizer, share, shots=inputs.shots, **ev.scoring_options(options))
    gathered: list | None = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(scored, gathered, dst=0)
    if env.rank != 0:
        return
    seconds = time.perf_counter() - started
    n = len(inputs.questions)
    choices: list[int | None] = [None] * n
    details: list[dict] = [{}] * n
    for rank, (rank_choices, rank_details, _) in enumerate(gathered):
        choices[rank::env.world_size] = rank_choices
        details[rank::env.world_size] = rank_details
    result = ev.summarize(inputs.questions, choices, details, seconds=seconds,
                          truncated=sum(truncated for _, _, truncated in gathered),
                          mode=ev.eval_mode(options.generate, options.score))
    report, predictions = ev.report(options, inputs, result)
    ev.write_predictions(run_dir / PREDICTIONS, predictions)
    report = dataclasses.replace(report, world_size=env.world_size)
    write_atomically(run_dir / RESULT, json.dumps(report.to_json(), indent=2) + "\n")
    print(f"{options.task}: accuracy {report.accuracy} ({report.correct}/{report.n_labelled}), n {n}, "
          f"{report.questions_per_s} questions/s over {env.world_size} ranks", flush=True)
    events.record(run_dir, "finished", accuracy=report.accuracy, n=n, questions_per_s=report.questions_per_s)


def run_harness(run_dir: Path, options: EvalSpec, env: Dist) -> None:
    """lm-evaluation-harness in this one process (a harness job has one per node, one node):
    RUN_DIR/harness.json holds lm-eval's results, eval.json the summary `status` reads."""
    from llamajobs import harness

    harness.offline(run_dir / "harness" / "datasets-cache")
    events.record(run_dir, "started", world_size=env.world_size, hosts=sorted(set(env.hosts)),
                  device=device_description(env.device), harness=list(options.harness))
    summary, results = harness.run(options, str(env.device))
    write_atomically(run_dir / harness.RESULT, json.dumps(results, indent=2, default=str) + "\n")
    write_atomically(run_dir / RESULT, json.dumps(summary, indent=2) + "\n")
    print(harness.describe(summary), flush=True)
    events.record(run_dir, "finished", accuracy=summary["accuracy"], harness=list(options.harness))


def announce(run_dir: Path, env: Dist, n: int) -> None:
    if env.rank != 0:
        return
    print(f"eval: {n} questions over {env.world_size} ranks on {device_description(env.device)}", flush=True)
    events.record(run_dir, "started", world_size=env.world_size, hosts=sorted(set(env.hosts)),
                  device=device_description(env.device), questions=n)


if __name__ == "__main__":
    sys.exit(main())
