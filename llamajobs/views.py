"""How the CLI shows what the operations (llamajobs/ops.py) return: rich tables and detail views on
stdout, progress and notes on stderr, or one JSON document.

Views only format: every number and decision comes in with the result.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llamajobs.catalog import Accelerator, allocates_gpus
from llamajobs.estimate.results import Grid, MeasuredHours, MemoryTable, PredictedHours, StepPlan
from llamajobs.evaluate import EvalResult, eval_mode
from llamajobs.events import attempts
from llamajobs.monitor import Row
from llamajobs.presets import DIR as PRESETS_DIR
from llamajobs.presets.listing import PresetEstimate
from llamajobs.ops import Detail, Submitted
from llamajobs.spec import JobSpec

# Paths must stay whole for copy and paste; piped output gets room for the status table.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    """One JSON document on stdout, nothing else (scripts parse it)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):  # inf: from damaged metrics or events
        return "-"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def eta(seconds: float | None) -> str:
    """The time left and the time of day it ends: '5:12:00 (Tue 14:05)'."""
    if seconds is None:
        return "-"
    try:
        ends = time.strftime('%a %H:%M', time.localtime(time.time() + seconds))
    except (OverflowError, ValueError, OSError):  # centuries away: a damaged metric's step time
        return duration(seconds)
    return f"{duration(seconds)} ({ends})"


def hours(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def percent(fraction: float | None, digits: int = 1) -> str:
    return "-" if fraction is None else f"{fraction * 100:.{digits}f}%"


# --- submit and wait ---


def submitted(result: Submitted, gpu_note: str = "", kind: str = "job") -> None:
    job = result.job
    out.print(f"{kind} [bold]{job.id}[/] ({job.cluster} job {job.cluster_job_id}) submitted; run dir "
              f"{escape(str(job.run_dir))}")
    if result.predicted_hours_per_epoch is not None:
        out.print(f"predicted hours per epoch: {result.predicted_hours_per_epoch:.3g}{gpu_note}")


def chosen_plan(spec: JobSpec) -> None:
    """submit's note of the micro-batch it runs (on stderr: stdout stays for --json)."""
    if spec.micro_batch_auto or spec.sharded_accumulation:
        picked = " (auto: the fastest that fits)" if spec.micro_batch_auto else ""
        how = ", sharded accumulation" if spec.sharded_accumulation else ""
        err.print(f"micro-batch {spec.micro_batch}{picked}{how}; recorded in spec.json", markup=False)


def step_line(row: Row) -> None:
    """--wait's progress, on stderr (stdout stays for --json)."""
    err.print(f"job {row.id} {row.state} step {row.step}/{row.total_steps} loss {fmt(row.loss, '.4f')} "
              f"tok/s {fmt(row.tokens_per_s, ',.0f')} MFU {percent(row.mfu)} ({row.peak})")


# --- status ---


def state(row: Row) -> str:
    """The state; a damaged run dir says what is wrong, a STALLED job how old its last metric is."""
    if row.problem:
        return f"{row.state}: {row.problem}"
    if row.state == "STALLED" and row.last_metric_age_s is not None:
        return f"STALLED, no metric for {duration(row.last_metric_age_s)}"
    if row.slow:
        return f"{row.state}, SLOW"
    return row.state


def epoch(epochs: float | None) -> str:
    """Within the first epoch its percentage; later, epochs done."""
    if epochs is None:
        return "-"
    return f"{epochs * 100:.1f}%" if epochs <= 1 else f"{epochs:.2f} ep"


def status_table(rows: list[Row]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("id", "name", "job", "state", "nodes×gpus", "size/mode/strategy", "step", "epoch",
                "loss", "val loss", "tok/s", "tok/s/gpu", "MFU", "ETA", "elapsed"):
        table.add_column(col)
    for r in rows:
        accuracy = f" acc {r.accuracy:.1%}" if r.accuracy is not None else ""
        table.add_row(
            str(r.id), escape(r.name), f"{r.cluster}:{r.cluster_job_id}", escape(state(r)),
            f"{r.nodes}×{r.gpus_per_node}" if allocates_gpus(r.cluster) else f"{r.nodes}×{r.procs_per_node} cpu",
            f"{r.size}/{r.mode}/{r.strategy}{accuracy}", f"{fmt(r.step)}/{fmt(r.total_steps)}", epoch(r.epoch),
            fmt(r.loss, ".4f"), fmt(r.val_loss, ".4f"),
            fmt(r.tokens_per_s, ",.0f"), fmt(r.tokens_per_s_per_gpu, ",.0f"), percent(r.mfu),
            eta(r.eta_s), duration(r.elapsed_s),
        )
    return table


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    values = [v for v in values if v == v and abs(v) != float("inf")]  # a diverged step's NaN has no height
    if not values:
        return ""
    values = values[::max(1, len(values) // width)]
    lo, hi = min(values), max(values)
    return "".join(SPARK[int((v - lo) / (hi - lo + 1e-12) * (len(SPARK) - 1))] for v in values)


def detail(d: Detail) -> None:
    """`status JOB`: the spec, progress, events, logs and the first error."""
    job, row, spec = d.job, d.row, d.spec
    out.print(f"[bold]job {job.id}[/] {escape(job.name)}  {escape(state(row))}  ({job.cluster} job "
              f"{job.cluster_job_id})", highlight=False)
    out.print(f"run dir   {job.run_dir}", markup=False)
    if spec is not None and spec.hub_id:
        out.print(f"model     {spec.hub_id}@{spec.hub_revision}, commit {spec.hub_commit} (in {spec.hf_home})",
                  markup=False)
    if row.problem:
        out.print(f"problem   {row.problem}", style="red", markup=False)
    if spec is not None and spec.evaluation is not None:
        _eval_progress(d)
    elif spec is not None:
        _training_progress(d)
    runs = attempts(d.events)
    if len(runs) > 1 or any(a.end != "running" and not a.end.startswith("finished") for a in runs):
        out.print("attempts")
        for a in runs:
            start = f"resumed at step {a.resumed_step}" if a.resumed_step is not None else "from the start"
            out.print(f"  {a.number}  {a.nodes or '-'}  {start}  -> {a.end}", markup=False)
    out.print("events")
    for e in d.events:
        extra = {k: v for k, v in e.items() if k not in ("time", "event")}
        try:
            when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e["time"]))
        except (TypeError, ValueError, OverflowError, OSError):  # a damaged time, beyond any date
            when = "?"
        out.print(f"  {when}  {e.get('event')}  {extra}", markup=False)
    out.print("logs")
    for path in d.logs:
        out.print(f"  {path}", markup=False)
    if row.slow:
        out.print(f"SLOW: {row.slow}", style="yellow", markup=False)
    if row.error:
        out.print(f"first error: {row.error}", style="red", markup=False)
        if d.error_hint:
            out.print(d.error_hint)
    if row.state == "OUT_OF_MEMORY" and spec is not None:
        out.print("out of memory: lower --micro-batch, add --activation-checkpointing, or see "
                  f"`llamajobs estimate memory --size {spec.size} --mode {spec.mode}` for the strategy that fits")
    if row.state in ("FAILED", "OUT_OF_MEMORY"):
        out.print(f"first error's log: {d.error_log}" if d.error_log else "no log holds an error", style="red",
                  markup=False)


def _training_progress(d: Detail) -> None:
    spec, row = d.spec, d.row
    out.print(f"model     {spec.size} {spec.mode} {spec.strategy}, {spec.nodes} node(s) "
              f"seq {spec.seq_len} global batch {spec.global_batch} micro {spec.micro_batch} lr {spec.lr}")
    if spec.objective == "dpo":
        out.print(f"objective dpo, loss {spec.loss}, beta {spec.beta}")
    out.print(f"progress  step {fmt(row.step)}/{fmt(row.total_steps)}  loss {fmt(row.loss, '.4f')}  "
              f"tok/s {fmt(row.tokens_per_s, ',.0f')}  MFU {percent(row.mfu, 2)} "
              f"(peak {row.peak or '-'})  ETA {eta(row.eta_s)}  elapsed {duration(row.elapsed_s)}")
    share = f" ({row.data_wait_frac:.1%} of the step)" if row.data_wait_frac is not None else ""
    last_save = f", the last in {row.checkpoint_s:.1f} s" if row.checkpoint_s is not None else ""
    out.print(f"time      data wait {fmt(row.data_wait_s, '.4f')} s/step{share}  checkpoints {row.checkpoints}"
              f"{last_save}  peak memory {fmt(row.mem_gib, '.2f')} GiB per process")
    if d.slow_input:
        out.print(f"[yellow]slow input: each step waits {row.data_wait_frac:.0%} of its time for the next batch; "
                  "is the token store (--data) on a slow filesystem? copy it to node-local disk or a faster one[/]")
    if d.losses:
        out.print(f"loss      {sparkline(d.losses)}  {d.losses[0]:.3f} → {d.losses[-1]:.3f}")
    if p := d.preference:
        out.print(f"dpo       step {p.step}: reward accuracy {fmt(p.reward_accuracy, '.3f')}  margin "
                  f"{fmt(p.reward_margin, '.4f')}  log-prob chosen {fmt(p.chosen_logp, '.3f')} rejected "
                  f"{fmt(p.rejected_logp, '.3f')}")
    if d.val_losses:
        values = [v for _, v in d.val_losses]
        out.print(f"val loss  {sparkline(values)}  {values[0]:.3f} → {values[-1]:.3f} "
                  f"(eval split, {len(values)} runs, the last at step {d.val_losses[-1][0]})")


def _eval_progress(d: Detail) -> None:
    """An eval job has no steps: what it scores, then its result once eval.json is there."""
    evaluation, result, run_dir = d.spec.evaluation, d.eval_result, d.job.run_dir
    adapter = f" + adapter {evaluation.adapter}" if evaluation.adapter else ""
    if evaluation.harness:  # lm-evaluation-harness
        out.print(f"eval      lm-eval {','.join(evaluation.harness)} (tasks {evaluation.data or 'lm-eval registry'}, "
                  f"{evaluation.shots}-shot), model {evaluation.model}{adapter}", markup=False)
        if result is None:
            out.print(f"result    none yet  elapsed {duration(d.row.elapsed_s)}")
        else:
            harness_result(result)
            out.print(f"          {run_dir / 'eval.json'}, {run_dir / 'harness.json'}", markup=False)
        return
    mode = eval_mode(evaluation.generate, evaluation.score)
    out.print(f"eval      {evaluation.task} {evaluation.data} ({evaluation.shots}-shot, {mode}), "
              f"model {evaluation.model}{adapter}", markup=False)
    if result is None:
        out.print(f"result    none yet  elapsed {duration(d.row.elapsed_s)}")
        return
    choices = " ".join(f"{k} {v}" for k, v in result.choices.items())
    out.print(f"result    accuracy {percent(result.accuracy)} ({result.correct}/{result.n_labelled}), "
              f"n {result.n}, {result.questions_per_s} questions/s over {fmt(result.world_size)} "
              f"processes  chosen {choices}  elapsed {duration(d.row.elapsed_s)}")
    out.print(f"          {run_dir / 'eval.json'}, {run_dir / 'predictions.jsonl'}", markup=False)


# --- estimate ---


def grid(result: Grid, gpu: Accelerator) -> None:
    table = Table(box=None, header_style="bold")
    for col in ("size", "strategy", "mode", "hours/epoch", "MFU", "GPU GiB", "CPU GiB/node", "verdict", "micro-batch"):
        table.add_column(col)
    for r in result.rows:
        table.add_row(r.size, r.strategy, r.mode, hours(r.hours_per_epoch), f"{r.mfu:.1%}", f"{r.gpu_mem_gib:.1f}",
                      f"{r.cpu_mem_gib:.0f}", r.verdict, str(r.micro_batch))
    out.print(table)
    out.print(f"GPU: {gpu.name} ({gpu.peak_bf16_flops / 1e12:g} TFLOP/s bf16, {gpu.memory_gib:g} GiB); "
              f"MFU is model FLOPs over that peak")


def presets(rows: list[PresetEstimate], gpu: Accelerator) -> None:
    table = Table(box=None, header_style="bold")
    for col in ("preset", "what", "size", "mode", "strategy", "nodes x GPUs", "tokens/epoch", "hours/epoch", "GPU GiB",
                "verdict"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, r.description, r.size, r.mode, r.strategy, f"{r.nodes}x{r.gpus_per_node}",
                      f"{r.tokens_per_epoch / 1e9:g}B", hours(r.hours_per_epoch), f"{r.gpu_mem_gib:.1f}", r.verdict)
    out.print(table)
    out.print(f"Estimated on {gpu.name} (--gpu); a Hub model at its shape in the catalog. Run one with "
              f"`llamajobs submit --config NAME` (flags win over it); the files are in {PRESETS_DIR}.",
              markup=False, highlight=False)


def hours_table(r: PredictedHours | MeasuredHours) -> None:
    table = Table(box=None, show_header=False)
    if isinstance(r, PredictedHours) and r.spec is not None:
        s = r.spec
        table.add_row("plan", plan_line(r.plan))
        table.add_row("run", f"{s.size} {s.mode}, {s.strategy}, {s.nodes}x{s.gpus_per_node} {r.peak}, seq {s.seq_len}, "
                             f"global batch {s.global_batch}, micro {s.micro_batch}")
    elif isinstance(r, PredictedHours):
        table.add_row("plan", plan_line(r.plan))
    if isinstance(r, PredictedHours) and r.shard_within_choice:
        c = r.shard_within_choice
        table.add_row("shard within", f"{c['shard_within']}: {c['reason']}")
        for layout, what in (("node", "node (hybrid: shard in a node, replicate across nodes)"),
                             ("all", "all (every GPU of the job)")):
            row = c["layouts"][layout]
            table.add_row(f"  {layout}", f"{row['step_s']:.3g} s per step (communication {row['comm_s']:.3g} s), "
                                         f"{row['gpu_mem_gib']:.1f} GiB per GPU at micro-batch {row['micro_batch']}, "
                                         f"{row['verdict']}; {what}")
    table.add_row("hours per epoch", hours(r.hours_per_epoch) + (
        f" ({r.tokens_per_epoch:,} tokens)" if r.tokens_per_epoch else "  (pass --tokens 2.5B)"))
    table.add_row("tokens/s", f"{r.tokens_per_s:,.0f} total, {fmt(r.tokens_per_s_per_gpu, ',.0f')} per GPU")
    mfu = "-" if r.mfu is None else f"{r.mfu:.1%}"
    table.add_row(f"MFU ({'measured' if r.measured else 'assumed'})", f"{mfu} of {r.peak or '?'}'s peak")
    if isinstance(r, MeasuredHours):
        table.add_row("step", f"{r.step_s:.3g} s")
        table.add_row("steps", f"{r.step}/{fmt(r.total_steps)} ({r.steady_steps} steady steps timed, "
                               f"{r.checkpoint_s:.0f} s of checkpoints left out)")
        table.add_row("remaining", duration(r.remaining_s))
        if r.predicted_tokens_per_s:
            table.add_row("predicted", f"{r.predicted_tokens_per_s:,.0f} tokens/s on this card")
        table.add_row("peak memory per process", fmt(r.gpu_mem_gib, ".1f") + " GiB")
    else:
        parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r.time_parts_s.items() if v)
        table.add_row("step", f"{r.step_s:.3g} s ({r.accumulation} micro-batches: {parts})")
        table.add_row("memory per GPU", f"{r.gpu_mem_gib:.1f} GiB")
        table.add_row("memory per node (CPU)", f"{r.cpu_mem_gib:.0f} GiB")
        table.add_row("verdict", r.verdict)
        table.add_row("largest micro-batch that fits", fmt(r.largest_fitting_micro_batch))
        table.add_row("expected error", r.expected_error)
    out.print(table)


def plan_line(plan: StepPlan) -> str:
    """The plan a run would run: its micro-batch (and whether auto picked it) and how gradients accumulate."""
    how = {"sharded": ", reduce-scattered into the shard every micro-batch",
           "unsharded": ", an unsharded fp32 gradient accumulated until the last"}.get(plan.gradient_accumulation, "")
    picked = " (auto: the fastest that fits)" if plan.micro_batch_auto else ""
    return f"micro-batch {plan.micro_batch}{picked}, {plan.micro_batches_per_step} per step{how}"


def memory_table(result: MemoryTable, spec: JobSpec, accel: Accelerator) -> None:
    table = Table(box=None, header_style="bold")
    for col in ("strategy", "GPU GiB", "CPU GiB/node", "verdict", "tokens/s", "micro-batch"):
        table.add_column(col)
    for r in result.strategies:
        table.add_row(r.strategy, f"{r.gpu_mem_gib:.1f}", f"{r.cpu_mem_gib:.0f}", r.verdict, f"{r.tokens_per_s:,.0f}",
                      f"{r.micro_batch}" + (" sharded" if r.accumulation == "sharded" else ""))
    out.print(table)
    first = result.strategies[0]
    out.print(f"{spec.size} {spec.mode} on {spec.nodes}x{spec.gpus_per_node} {accel.name} "
              f"({first.gpu_capacity_gib:g} GiB per GPU, {first.node_ram_gib:g} GiB host RAM per node); "
              + ("micro-batch: auto, each strategy's fastest that fits" if spec.micro_batch_auto
                 else f"micro-batch {spec.micro_batch}"))
    none = "none fits; add nodes, use --mode lora or --activation-checkpointing"
    out.print(f"recommended: {result.recommended or none}")


# --- eval, generate, convert ---


def eval_result(result: EvalResult) -> None:
    """Accuracy, n, throughput and the choice counts; notes on stderr."""
    ranks = f" over {result.world_size} processes" if result.world_size else ""
    out.print(f"{result.task} ({result.mode}, {result.shots}-shot): accuracy "
              f"[bold]{percent(result.accuracy)}[/] ({result.correct}/{result.n_labelled}), "
              f"n {result.n}, {result.questions_per_s} questions/s{ranks}")
    table = Table(box=None, header_style="bold")
    table.add_column("")
    for key in result.choices:
        table.add_column(key)
    table.add_row("chosen", *(str(v) for v in result.choices.values()))
    table.add_row("gold", *(str(result.gold.get(k, "-")) for k in result.choices))
    out.print(table)
    for note in list(result.notes) + ([f"{result.truncated} prompt(s) truncated to fit the model"]
                                      if result.truncated else []):
        err.print(f"note: {note}", markup=False)


def harness_result(summary: dict[str, Any]) -> None:
    """lm-eval's metrics per task (stderr left out; harness.json has it)."""
    table = Table(box=None, header_style="bold")
    metrics = sorted({k for m in summary["tasks"].values() for k in m if k != "n"})
    for col in ("task", *metrics, "n"):
        table.add_column(col)
    for task, m in summary["tasks"].items():
        table.add_row(escape(task), *(fmt(m.get(k), ".4f") if isinstance(m.get(k), float) else fmt(m.get(k))
                                      for k in metrics), fmt(m.get("n")))
    out.print(table)
    out.print(f"lm-eval {summary.get('lm_eval_version')}, {summary['seconds']} s", style="dim", markup=False)


def converted(result: dict[str, Any]) -> None:
    out.print(f"converted {result['shards_in']} shard(s) into {result['out']}: {result['params'] / 1e9:.2f}B "
              f"parameters, {result['dtype']}, {result['files_out']} safetensors file(s)", markup=False)
    out.print(f"dim {result['dim']}, {result['n_layers']} layers, {result['n_heads']} heads "
              f"({result['n_kv_heads']} kv), ffn {result['ffn_dim']}, vocab {result['vocab_size']}")


def wrote(path: Path | str, what: str = "wrote") -> None:
    out.print(f"{what} {path}", markup=False, highlight=False)


def watch(rows: Callable[[], list[Row]], every_s: float = 2.0) -> None:
    """`status --watch`: the table refreshed in place until Ctrl-C."""
    from rich.live import Live

    with Live(status_table(rows()), console=out, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(every_s)
                live.update(status_table(rows()))
        except KeyboardInterrupt:
            pass


def note(line: str) -> None:
    """A line for the user on stderr (what was submitted, what was decided)."""
    err.print(line, markup=False, highlight=False)
