"""Models: convert Meta checkpoints, eval (here or as a job), generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from llamajobs import catalog, ops, views
from llamajobs.cli.options import (PLACEMENT_OPTIONS, QUEUE_OPTIONS, Choice, json_option, options, runs_dir_option,
                                   typed)
from llamajobs.errors import Failure, SpecError
from llamajobs.spec import EVAL_FIELDS, EvalSpec, default
from llamajobs.values import DEVICES


@click.command()
@click.option("--input-dir", required=True, type=click.Path(file_okay=False),
              help="Meta's checkpoint folder: consolidated.NN.pth shards and params.json.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The Hugging Face directory to write (new or empty).")
@click.option("--size", type=Choice(tuple(catalog.SIZES)), default=None,
              help="Cross-check the shape against the catalog.")
@click.option("--tokenizer", "tokenizer_file", default=None, type=click.Path(dir_okay=False),
              help="Meta's tokenizer.model, sentencepiece (LLaMA-1/2) or tiktoken (Llama 3) (default: in "
                   "--input-dir or its parent).")
@click.option("--max-seq-len", type=int, default=None,
              help="max_position_embeddings (default: params.json's, else 2048 for LLaMA-1, 4096 for LLaMA-2, "
                   "8192 for Llama 3, 131072 with use_scaled_rope).")
@json_option
def convert(input_dir: str, out_dir: str, size: str | None, tokenizer_file: str | None, max_seq_len: int | None,
            as_json: bool) -> None:
    """Meta's consolidated.*.pth + params.json + tokenizer.model -> an HF LLaMA directory (LLaMA-1, 2, 3, 3.1).

    The shape comes from params.json and the shards from the files (merged, streamed layer group by
    layer group); --size only cross-checks.
    """
    import llamajobs.convert

    result = llamajobs.convert.convert(input_dir, out_dir, size=size, tokenizer=tokenizer_file,
                                       max_seq_len=max_seq_len)
    views.print_json(result) if as_json else views.converted(result)


def _default(name: str) -> str:
    return f" (default {EVAL_FIELDS[name].default})"


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="HF LLaMA directory (convert's output, a run's final/ or final/merged).")
@click.option("--adapter", default=None, type=click.Path(file_okay=False), help="A LoRA adapter (a LoRA run's final/).")
@click.option("--task", type=Choice(catalog.TASKS), default=None, help="The multiple-choice set.")
@click.option("--data", default=None, type=click.Path(dir_okay=False), help="The questions (JSONL; JSON list or dict).")
@click.option("--harness", default=None, help="Run lm-evaluation-harness tasks instead (TASK[,TASK]; needs the "
              "`harness` extra); --model may then be a job id (its final/).")
@click.option("--tasks-dir", default=None, type=click.Path(file_okay=False),
              help="With --harness: a folder of lm-eval task YAMLs over local data files (default: lm-eval's own "
                   "registry, datasets from the local cache only).")
@click.option("--shots", type=int, default=None, help="Solved examples before each question" + _default("shots") + ".")
@click.option("--shots-file", default=None, type=click.Path(dir_okay=False), help="Where the shots come from (first K).")
@click.option("--generate", "use_generate", is_flag=True, help="Greedy-generate and parse the letter instead of scoring.")
@click.option("--score", type=Choice(catalog.SCORES), default=None,
              help="letter: log-likelihood of the option's letter; text: of its text" + _default("score") + ".")
@click.option("--batch-size", type=int, default=None, help="Questions per forward pass" + _default("batch_size") + ".")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--max-new-tokens", type=int, default=None, help="With --generate" + _default("max_new_tokens") + ".")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False),
              help="Write per-question results (JSONL); checked writable before scoring. A cluster job writes "
                   "RUN_DIR/predictions.jsonl.")
@click.option("--cluster", type=Choice(catalog.CLUSTERS), default=None,
              help="Submit the eval as a job there (default: run it here).")
@options(PLACEMENT_OPTIONS + QUEUE_OPTIONS)
@click.option("--name", default=None, help="With --cluster: the job's name (default eval-TASK).")
@click.option("--wait", is_flag=True, help="With --cluster: block until the job ends, then print its accuracy.")
@runs_dir_option
@json_option
def evaluate(model_dir: str, adapter: str | None, task: str | None, data: str | None, harness: str | None,
             tasks_dir: str | None, shots: int | None, shots_file: str | None,
             use_generate: bool, score: str | None, batch_size: int | None, limit: int | None,
             max_new_tokens: int | None, predictions: str | None, wait: bool, runs_dir: str | None, as_json: bool,
             **values: Any) -> None:
    """Multiple-choice accuracy on MedQA-USMLE, MedMCQA or PubMedQA: n, accuracy, choice counts.

    Runs here, or with --cluster as a job (the questions split over its worker processes; `status`,
    `logs` and `cancel` as for training; RUN_DIR/eval.json holds what --json prints).
    With --harness, lm-evaluation-harness tasks on the model, here or as a job the same way.
    """
    if harness is not None or tasks_dir is not None:
        extra = {"task": task, "data": data, "shots_file": shots_file, "generate": use_generate or None, "score": score,
                 "max_new_tokens": max_new_tokens, "predictions": predictions}
        return _harness(model_dir, adapter, harness, tasks_dir, shots, batch_size, limit, wait, runs_dir, as_json,
                        extra, values)
    if task is None or data is None:
        raise SpecError(f"--{'task' if task is None else 'data'} is needed (or --harness TASK[,TASK] for lm-eval)")
    given = {"model": model_dir, "adapter": adapter, "task": task, "data": data, "shots": shots,
             "shots_file": shots_file, "generate": use_generate, "score": score, "batch_size": batch_size,
             "limit": limit, "max_new_tokens": max_new_tokens}
    settings = EvalSpec(**{k: v for k, v in given.items() if v is not None})
    if values["cluster"] is None:
        job_flags = [k for k, v in values.items() if v is not None and k != "device"] + (["wait"] if wait else [])
        if job_flags:
            raise SpecError(f"--{job_flags[0].replace('_', '-')} is for an eval job: add --cluster slurm or "
                            f"--cluster local (without --cluster, eval runs here)")
        done = ops.evaluate_here(settings, values["device"] or default("device"),
                                 Path(predictions) if predictions else None)
        views.print_json(done.result.to_json()) if as_json else views.eval_result(done.result)
        if done.predictions_error:
            raise Failure(done.predictions_error)
        return
    if predictions:
        raise SpecError(f"--predictions {predictions}: an eval job writes RUN_DIR/predictions.jsonl; leave it out")
    result = ops.submit_eval(settings, typed(values), ops.runs_dir(runs_dir, writable=True))
    if _follow(result, "eval job", wait, as_json, ops.eval_result, views.eval_result) is None and wait:
        raise Failure(f"job {result.job.id} completed without writing {result.job.run_dir / 'eval.json'}")


def _follow(result: ops.Submitted, kind: str, wait: bool, as_json: bool, read: Callable[[Any, str], Any],
            show: Callable[[Any], None]) -> Any:
    """An eval job as submitted; with --wait, its end and its results (failing unless it COMPLETED)."""
    if not wait:
        views.print_json(result.to_json()) if as_json else views.submitted(result, kind=kind)
        return None
    if not as_json:
        views.submitted(result, kind=kind)
    state = ops.wait(result.job)
    scored = read(result.job, state)
    if as_json:
        document = scored.to_json() if hasattr(scored, "to_json") else scored  # lm-eval's summary is a dict
        views.print_json({**result.to_json(), "state": state, **(document or {})})
    else:
        views.out.print(f"job {result.job.id} ended {state}")
        if scored:
            show(scored)
    ops.fail_unless_completed(result.job, state)
    return scored


def _harness(model_dir: str, adapter: str | None, tasks: str | None, tasks_dir: str | None, shots: int | None,
             batch_size: int | None, limit: int | None, wait: bool, runs_dir: str | None, as_json: bool,
             extra: dict[str, Any], values: dict[str, Any]) -> None:
    """`eval --harness`: lm-evaluation-harness here, or as a job."""
    from llamajobs import harness

    if not tasks or not [t for t in tasks.split(",") if t.strip()]:
        raise SpecError("--tasks-dir is for --harness TASK[,TASK]: name the tasks to run")
    if given := [k for k, v in extra.items() if v is not None]:
        raise SpecError(f"--{given[0].replace('_', '-')} is for the built-in eval; --harness runs lm-eval's tasks")
    settings = EvalSpec(model=model_dir, adapter=adapter, task=harness.HARNESS_TASK, data=tasks_dir or "",
                        harness=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                        **{k: v for k, v in {"shots": shots, "batch_size": batch_size, "limit": limit}.items()
                           if v is not None})
    if values["cluster"] is None:
        summary = harness.harness_here(settings, values["device"] or default("device"), ops.runs_dir(runs_dir))
        views.print_json(summary) if as_json else views.harness_result(summary)
        return
    result = harness.submit_harness(settings, typed(values), ops.runs_dir(runs_dir, writable=True))
    if _follow(result, "lm-eval job", wait, as_json, ops.harness_result, views.harness_result) is None and wait:
        raise Failure(f"job {result.job.id} completed without writing {result.job.run_dir / 'eval.json'}")


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="HF LLaMA directory.")
@click.option("--adapter", default=None, type=click.Path(file_okay=False), help="A LoRA adapter (a LoRA run's final/).")
@click.option("--prompt", required=True, help="The text to continue, as given.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="For sampling (temperature > 0).")
@click.option("--device", type=Choice(DEVICES), default="auto", show_default=True)
def generate(model_dir: str, adapter: str | None, prompt: str, max_new_tokens: int, temperature: float,
             top_p: float, seed: int, device: str) -> None:
    """Continue a prompt (greedy by default); prints only the generated text."""
    from llamajobs.evaluate import continue_prompt

    click.echo(continue_prompt(model_dir, prompt, adapter=adapter, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, device=device))
