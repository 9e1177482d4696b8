"""lm-evaluation-harness (PyPI `lm-eval`, the optional extra `llamajobs[harness]`) on a model, here
or as a job: `llamajobs eval --harness TASK[,TASK] [--tasks-dir DIR] --model DIR|JOB`.

The model is an HF directory, or a run's final/ (a LoRA run's: its base plus the adapter, as the
built-in eval reads it; a job id names the run's final/). lm-eval's own `hf` model runs it, with
`peft` for the adapter. Tasks come from --tasks-dir (task YAMLs whose data are local files, e.g.
`dataset_path: json` with `data_files`), or, without it, from lm-eval's own registry; either way
nothing is fetched: the job runs with HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set (`offline`), so a
registry task needs its dataset in the local datasets cache already. The datasets lm-eval builds from
local files are cached in RUN_DIR/harness/datasets-cache (not the user's home).

As a job it runs in one process per node (lm-eval shares a model over the node's GPUs itself, with
`parallelize`), on one node. RUN_DIR/harness.json holds lm-eval's results (config, versions,
per-task metrics); RUN_DIR/eval.json the summary that `status` and `eval --json` show.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamajobs.errors import SpecError

if TYPE_CHECKING:
    from llamajobs import ops
    from llamajobs.spec import EvalSpec

HARNESS_TASK = "harness"  # EvalSpec.task of a harness eval (its tasks are EvalSpec.harness)
RESULT = "harness.json"
STDERR_SUFFIX = "_stderr"


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise SpecError("--harness runs lm-evaluation-harness: pip install 'llamajobs[harness]' (or lm-eval) "
                        "where the eval runs") from None
    return lm_eval


def offline(cache_dir: Path) -> None:
    """A job's environment, before `datasets` is imported (it reads these once): no Hub, and the
    datasets built from local files cached in the run dir (unless the environment says otherwise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir))


def task_manager(tasks_dir: str | None) -> Any:
    """lm-eval's task index: --tasks-dir's YAMLs only, or lm-eval's own registry without one."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if tasks_dir is None:
        return TaskManager()
    if not Path(tasks_dir).is_dir():
        raise SpecError(f"--tasks-dir {tasks_dir}: not a directory of lm-eval task YAML files")
    return TaskManager(include_path=str(Path(tasks_dir).absolute()), include_defaults=False)


def check_tasks(tasks: tuple[str, ...], tasks_dir: str | None) -> None:
    """Refuse, before anything runs or is queued, a task the index does not have."""
    known = set(task_manager(tasks_dir).all_tasks)
    for task in tasks:
        if task not in known:
            where = f"--tasks-dir {tasks_dir}" if tasks_dir else "lm-eval's task registry"
            some = ", ".join(sorted(known)[:10]) or "none"
            raise SpecError(f"--harness {task}: no such task in {where} (it has: {some}"
                            f"{', ...' if len(known) > 10 else ''})")


def model_args(model: str, adapter: str | None, device: str) -> dict[str, Any]:
    """lm-eval's `hf` model arguments: base, tokenizer and adapter as the built-in eval resolves them."""
    from llamajobs.evaluate import resolve_model

    base, adapter_dir, tokenizer = resolve_model(model, adapter)
    args: dict[str, Any] = {"pretrained": str(base), "tokenizer": str(tokenizer),
                            "dtype": "bfloat16" if device.startswith("cuda") else "float32"}
    if adapter_dir is not None:
        args["peft"] = str(adapter_dir)
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() > 1:
            args["parallelize"] = True  # one process, the model over the node's GPUs
    return args


def run(options: EvalSpec, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, lm-eval's results) of the harness tasks on options.model."""
    lm_eval = _lm_eval()
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args(options.model, options.adapter, device), tasks=list(options.harness),
        task_manager=task_manager(options.data or None), device=device, batch_size=options.batch_size,
        limit=options.limit, num_fewshot=options.shots or None, log_samples=False)
    if results is None:  # lm-eval returns None on ranks other than its first
        return {}, {}
    kept = {k: v for k, v in results.items() if k not in ("samples", "pretty_env_info")}
    return summarize(kept, options, time.perf_counter() - started), kept


def summarize(results: dict[str, Any], options: EvalSpec, seconds: float) -> dict[str, Any]:
    """Per task its metrics ("acc,none" -> "acc") and sample count; `accuracy`: the first task's acc
    (what `status` shows beside an eval job), when it has one."""
    tasks: dict[str, Any] = {}
    for task, metrics in results.get("results", {}).items():
        tasks[task] = {name.split(",")[0]: value for name, value in metrics.items()
                       if "," in name and isinstance(value, (int, float)) and not name.split(",")[0].endswith(
                           STDERR_SUFFIX)}
        samples = results.get("n-samples", {}).get(task, {})
        tasks[task]["n"] = samples.get("effective", samples.get("original"))
    first = tasks.get(options.harness[0], {}) if options.harness else {}
    accuracy = first.get("acc_norm", first.get("acc"))
    return {"harness": list(options.harness), "tasks": tasks, "accuracy": accuracy, "model": options.model,
            "adapter": options.adapter, "tasks_dir": options.data or None, "shots": options.shots,
            "limit": options.limit, "seconds": round(seconds, 2), "lm_eval_version": results.get("lm_eval_version")}


# --- operations (what `llamajobs eval --harness` calls) ---


def harness_options(options: EvalSpec, runs: Path | None) -> EvalSpec:
    """`eval --harness`: --model JOB as the run's final/, paths absolute, the model and the tasks
    checked (before anything runs or is queued)."""
    from llamajobs import ops

    model = options.model
    if model.isdigit() and not Path(model).exists() and runs is not None:
        model = str(ops.find_job(runs, int(model)).run_dir / "final")
    options = dataclasses.replace(options, model=str(Path(model).absolute()),
                                  adapter=str(Path(options.adapter).absolute()) if options.adapter else None,
                                  data=str(Path(options.data).absolute()) if options.data else "")
    check_tasks(options.harness, options.data or None)
    return options


def harness_here(options: EvalSpec, device: str, runs: Path | None) -> dict[str, Any]:
    from llamajobs import evaluate

    options = harness_options(options, runs)
    evaluate.resolve_model(options.model, options.adapter)
    return run(options, str(evaluate.resolve_device(device)))[0]


def submit_harness(options: EvalSpec, flags: dict[str, Any], runs: Path) -> ops.Submitted:
    """`eval --harness --cluster`: one process on one node (lm-eval spreads the model over its GPUs)."""
    from llamajobs import evaluate, ops, submit

    for name in ("nodes", "procs_per_node"):
        if flags.get(name) not in (None, 1):
            raise SpecError(f"--{name.replace('_', '-')} {flags[name]}: an lm-eval job runs one process on one node")
    options = harness_options(options, runs)
    spec, profile = ops.build_spec(flags, fixed={"evaluation": options, "nodes": 1, "procs_per_node": 1})
    ops.check_partition(spec, profile)  # more GPUs than its nodes have: named before sbatch refuses it
    if not spec.after:  # a model that a job it waits for will write need not exist yet
        evaluate.resolve_model(options.model, options.adapter)
    return ops.Submitted(submit.submit(spec, profile, runs).job)


def describe(summary: dict[str, Any]) -> str:
    """One line per task: its metrics."""
    return "\n".join(f"{task}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in metrics.items()) for task, metrics in summary["tasks"].items())
