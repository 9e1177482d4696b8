"""Evaluation: the three data formats, letter parsing, batching, a model fine-tuned here on a toy set
(near chance before, well above after), LoRA adapter == merged model, generation."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from llamajobs import evaluate as ev, questions as mcq
from llamajobs.data import formats
from llamajobs.errors import SpecError
from llamajobs.spec import EvalSpec
from tests.conftest import run_cli

# --- the toy set: the cue word in the question names the letter; the options are filler ---

CUES = ("north", "east", "south", "west")  # -> A, B, C, D
FILLER = ("apple river stone cloud heart liver kidney bone blood nerve muscle skin lung brain fever cough "
          "rash pain").split()


def toy_questions(n: int, seed: int) -> list[ev.Question]:
    """Balanced gold letters (n/4 each), so a model that always picks one letter scores exactly 25%."""
    rng = random.Random(seed)
    answers = [i % 4 for i in range(n)]
    rng.shuffle(answers)
    return [ev.Question(question=f"Which option points {CUES[a]}?", options=tuple(rng.sample(FILLER, 4)), answer=a)
            for a in answers]


def write_medqa(path: Path, questions: list[ev.Question]) -> Path:
    with open(path, "w") as f:
        for q in questions:
            f.write(json.dumps({"sent1": q.question, "sent2": "", **{f"ending{i}": o for i, o in enumerate(q.options)},
                                "label": q.answer}) + "\n")
    return path


# --- fixtures: a tokenizer, a random tiny model, the same model fine-tuned on the toy set ---

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def base_model(workdir, tokenizer_dir):
    """A randomly initialised tiny LLaMA (the catalog's tiny shape), saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamajobs.catalog import SIZES
    from llamajobs.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES["tiny"].hf_config()))
    folder = workdir / "base"
    model.save_pretrained(folder)
    load_tokenizer(tokenizer_dir).save_pretrained(folder)
    return folder


def fine_tune(model, tokenizer, questions: list[ev.Question], steps: int = 130, batch: int = 16, lr: float = 3e-3):
    """A plain PyTorch loop: loss on the answer letter and EOS only, the prompt masked (the template
    and encoding that evaluate.py exports for training)."""
    examples = []
    for q in questions:
        prompt, answer = ev.encode(tokenizer, mcq.mcq_prompt(q), ev.mcq_answer(q))
        examples.append((prompt, answer + [tokenizer.eos_id]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(0)
    model.train()
    losses = []
    for _ in range(steps):
        rows = rng.sample(examples, batch)
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            mask[i, :len(p) + len(a)] = 1
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.fixture(scope="module")
def toy(workdir):
    return {"train": write_medqa(workdir / "toy_train.jsonl", toy_questions(256, seed=0)),
            "test": write_medqa(workdir / "toy_test.jsonl", toy_questions(48, seed=1))}


@pytest.fixture(scope="module")
def tuned_model(workdir, base_model, toy):
    """The tiny model fully fine-tuned on the toy training set, saved as an HF directory."""
    model, tokenizer = ev.load_model(base_model, device="cpu")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread, much faster on a busy box
    try:
        model, losses = fine_tune(model, tokenizer, mcq.read_questions("medqa", toy["train"]))
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0] / 5, losses
    folder = workdir / "tuned"
    model.save_pretrained(folder)
    copy_tokenizer(base_model, folder)
    return folder


def copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.glob("tokenizer*"):
        shutil.copyfile(f, dst / f.name)


# --- train, then evaluate (the toy demo) ---

def test_fine_tuned_model_scores_above_chance(cli, base_model, tuned_model, toy):
    test_set = ("--task", "medqa", "--data", str(toy["test"]), "--json")
    code, stdout, stderr = cli("eval", "--model", str(base_model), *test_set)
    assert code == 0, stderr
    before = json.loads(stdout)
    code, stdout, stderr = cli("eval", "--model", str(tuned_model), *test_set)
    assert code == 0, stderr
    after = json.loads(stdout)
    assert before["n"] == after["n"] == 48 and before["mode"] == "loglik-letter"
    assert before["accuracy"] <= 0.45, before  # chance is 0.25 on the balanced set
    assert after["accuracy"] >= 0.9, after
    assert after["gold"] == {"A": 12, "B": 12, "C": 12, "D": 12}
    assert sum(after["choices"].values()) == 48
    # Generation and letter parsing reach the same answers.
    code, stdout, stderr = cli("eval", "--model", str(tuned_model), "--task", "medqa", "--data", str(toy["test"]),
                               "--generate", "--max-new-tokens", "4", "--json")
    assert code == 0, stderr
    generated = json.loads(stdout)
    assert generated["mode"] == "generate" and generated["accuracy"] >= 0.9, generated


def test_eval_prints_accuracy_n_and_choice_counts(cli, tuned_model, toy, tmp_path):
    predictions = tmp_path / "pred.jsonl"
    code, stdout, stderr = cli("eval", "--model", str(tuned_model), "--task", "medqa", "--data", str(toy["test"]),
                               "--limit", "8", "--predictions", str(predictions))
    assert code == 0, stderr
    assert "accuracy" in stdout and "n 8" in stdout and "chosen" in stdout and "gold" in stdout
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 8 and {"gold", "choice", "scores"} <= set(rows[0])


def test_lora_adapter_and_merged_model_agree(cli, workdir, tuned_model, toy):
    """A LoRA adapter with non-zero weights (init_lora_weights=False: as if trained) on the tuned model,
    evaluated as --adapter and as the merged full model: the same choices, the same scores."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tuned_model),
                                    LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter, merged = workdir / "adapter", workdir / "merged"
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().save_pretrained(merged)
    copy_tokenizer(tuned_model, merged)

    results = {}
    for label, args in {"adapter": ["--model", str(tuned_model), "--adapter", str(adapter)],
                        "merged": ["--model", str(merged)], "plain": ["--model", str(tuned_model)]}.items():
        pred = workdir / f"pred-{label}.jsonl"
        code, stdout, stderr = cli("eval", *args, "--task", "medqa", "--data", str(toy["test"]),
                                   "--predictions", str(pred), "--json")
        assert code == 0, stderr
        results[label] = (json.loads(stdout), [json.loads(line) for line in pred.read_text().splitlines()])
    (a, a_rows), (m, m_rows), (_, plain_rows) = results["adapter"], results["merged"], results["plain"]
    assert a["accuracy"] == m["accuracy"] and a["choices"] == m["choices"]
    assert [r["choice"] for r in a_rows] == [r["choice"] for r in m_rows]
    scores_a, scores_m = (torch.tensor([r["scores"] for r in rows]) for rows in (a_rows, m_rows))
    assert torch.allclose(scores_a, scores_m, atol=1e-3)
    # The adapter was applied: it moved the scores away from the model without it.
    assert not torch.allclose(scores_a, torch.tensor([r["scores"] for r in plain_rows]), atol=1e-2)
    # A LoRA run's final/ as --model: its base is found from llamajobs.json.
    (adapter / "llamajobs.json").write_text(json.dumps({"mode": "lora", "base_weights": str(tuned_model)}))
    code, stdout, stderr = cli("eval", "--model", str(adapter), "--task", "medqa", "--data", str(toy["test"]), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["choices"] == a["choices"]


def test_generate_continues_the_prompt_as_given(cli, tuned_model):
    q = toy_questions(4, seed=5)[2]
    code, stdout, stderr = cli("generate", "--model", str(tuned_model), "--prompt", mcq.mcq_prompt(q),
                               "--max-new-tokens", "3")
    assert code == 0, stderr
    assert stdout.strip() == "ABCD"[q.answer]
    code, _, stderr = cli("generate", "--model", str(tuned_model), "--prompt", "x", "--top-p", "0")
    assert code == 2 and "--top-p 0.0" in stderr


# --- eval as a job: the questions split over ranks, the same answers as in-process ---

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def in_process(tuned_model, toy) -> dict:
    """The in-process eval of the tuned model on the toy test set (what `eval --json` prints, with
    the per-question predictions)."""
    result, predictions = ev.evaluate(EvalSpec(model=str(tuned_model), task="medqa", data=str(toy["test"])),
                                      device="cpu")
    return {**result.to_json(), "predictions": predictions}


def assert_same_answers(job: dict, job_rows: list[dict], local: dict) -> None:
    for key in ("n", "n_labelled", "correct", "accuracy", "choices", "gold", "mode", "truncated", "shots"):
        assert job[key] == local[key], key
    local_rows = local["predictions"]
    assert [r["choice"] for r in job_rows] == [r["choice"] for r in local_rows]
    assert [r["index"] for r in job_rows] == list(range(local["n"]))
    # Other batches, other padding: the same scores up to float rounding.
    assert torch.allclose(torch.tensor([r["scores"] for r in job_rows]),
                          torch.tensor([r["scores"] for r in local_rows]), atol=1e-3)


@pytest.mark.slow
def test_eval_job_on_the_local_cluster_gives_the_in_process_answers(home, tuned_model, toy, in_process):
    """`eval --cluster local --procs-per-node 2 --wait`: real submitit and torchrun, each rank scores
    every second question, rank 0 gathers them; the same accuracy, choices and scores as in-process."""
    result = run_cli("eval", "--model", str(tuned_model), "--task", "medqa", "--data", str(toy["test"]),
                     "--cluster", "local", "--procs-per-node", "2", "--wait", check=True)
    assert f"accuracy {in_process['accuracy'] * 100:.1f}%" in result.stdout and "over 2 processes" in result.stdout
    job_id = int(result.stdout.split("eval job ")[1].split()[0])
    row = json.loads(run_cli("status", str(job_id), "--json", check=True).stdout)
    assert (row["kind"], row["state"], row["strategy"]) == ("eval", "COMPLETED", "medqa")
    assert row["accuracy"] == in_process["accuracy"]
    run_dir = Path(row["run_dir"])
    job = json.loads((run_dir / "eval.json").read_text())
    assert job["world_size"] == 2
    assert_same_answers(job, read_jsonl(run_dir / "predictions.jsonl"), in_process)
    detail = run_cli("status", str(job_id), check=True).stdout
    assert f"accuracy {in_process['accuracy'] * 100:.1f}%" in detail and "finished" in detail
    assert "eval: 48 questions over 2 ranks" in run_cli("logs", str(job_id), "--rank", "0", check=True).stdout
    for command in (("plot", str(job_id), "-o", str(run_dir / "x.png")), ("estimate", "hours", str(job_id))):
        refused = run_cli(*command)
        assert refused.returncode == 1 and f"job {job_id} is an eval job (medqa)" in refused.stderr, command
    print(f"questions/s on this box: in-process {in_process['questions_per_s']}, "
          f"local cluster with 2 ranks {job['questions_per_s']}")


@pytest.mark.slow
@pytest.mark.slurm
def test_eval_job_on_two_slurm_nodes_gives_the_in_process_answers(slurm, tmp_path, tuned_model, toy, in_process):
    """The same on the real SLURM cluster: one worker on each of two nodes, torchrun across them."""
    env = {"LLAMAJOBS_HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run_cli("eval", "--model", str(tuned_model), "--task", "medqa", "--data", str(toy["test"]),
                     "--cluster", "slurm", "--nodes", "2", "--procs-per-node", "1", "--device", "cpu",
                     "--time", "00:10:00", "--wait", "--json", env=env, check=True)
    job = json.loads(result.stdout)
    assert job["state"] == "COMPLETED" and job["world_size"] == 2
    assert_same_answers(job, read_jsonl(Path(job["run_dir"]) / "predictions.jsonl"), in_process)
    from llamajobs import events

    started = next(e for e in events.read(Path(job["run_dir"])) if e["event"] == "started")
    assert started["world_size"] == 2


@pytest.mark.parametrize("args, message", [
    (["--nodes", "2"], "--nodes is for an eval job: add --cluster"),
    (["--wait"], "--wait is for an eval job"),
    (["--cluster", "local", "--predictions", "p.jsonl"], "an eval job writes RUN_DIR/predictions.jsonl"),
    (["--cluster", "local", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--cluster", "local", "--task", "usmle"], "--task 'usmle' is not known"),
    (["--cluster", "moon"], "--cluster 'moon' is not allowed"),
    (["--cluster", "local", "--nodes", "2"], "--nodes 2: the local cluster has one node"),
    (["--cluster", "local", "--model", "."], "no config.json there"),
])
def test_bad_eval_job_input_is_one_line_and_exit_2_and_queues_nothing(cli, home, base_model, tmp_path, args, message):
    data = write(tmp_path / "d.jsonl", [{"question": "Q?", "context": "C", "final_decision": "yes"}])
    required = {"--model": str(base_model), "--task": "pubmedqa", "--data": str(data)}
    required = [x for flag, value in required.items() if flag not in args for x in (flag, value)]
    code, stdout, stderr = cli("eval", *required, *args)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert stdout == ""
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


# --- batching and the two scoring paths ---

def test_batched_scores_equal_one_at_a_time(base_model):
    model, tokenizer = ev.load_model(base_model, device="cpu")
    qs = toy_questions(6, seed=3) + [ev.Question(question="A much longer question " * 5, options=("a", "b", "c"),
                                                 answer=0, context="Some context. " * 4)]
    prompts = [mcq.mcq_prompt(q) for q in qs]
    for conts in ([[ev.mcq_answer(q, i) for i in range(len(q.options))] for q in qs],
                  [list(q.options) for q in qs]):  # letters (one forward) and texts (rows)
        batched, _ = ev.option_scores(model, tokenizer, prompts, conts, batch_size=7)
        single = [ev.option_scores(model, tokenizer, [p], [c], batch_size=1)[0][0] for p, c in zip(prompts, conts)]
        for b, s in zip(batched, single):
            assert b == pytest.approx(s, abs=1e-4)
    # The text path against a direct computation of log p(continuation | prompt).
    q = qs[-1]
    prompt_ids, cont = ev.encode(tokenizer, prompts[-1], "b")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + cont])).logits[0], -1)
    direct = sum(logp[len(prompt_ids) - 1 + t, tok].item() for t, tok in enumerate(cont))
    scores, _ = ev.option_scores(model, tokenizer, [prompts[-1]], [list(q.options)])
    assert scores[0][1] == pytest.approx(direct, abs=1e-4)


def test_long_prompts_are_truncated_from_the_left(base_model):
    model, tokenizer = ev.load_model(base_model, device="cpu")
    q = ev.Question(question="why?", options=("yes", "no"), answer=0, context="word " * 2000)
    scores, truncated = ev.option_scores(model, tokenizer, [mcq.mcq_prompt(q)], [["A", "B"]])
    assert truncated == 1 and len(scores[0]) == 2


# --- the data formats ---

def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_medqa_formats(tmp_path):
    path = write(tmp_path / "medqa.jsonl", [
        {"id": "1", "sent1": "A 45-year-old man has chest pain.", "sent2": "", "ending0": "MI", "ending1": "GERD",
         "ending2": "PE", "ending3": "Costochondritis", "label": 2},
        {"question": "Which vitamin?", "options": {"A": "A", "B": "B12", "C": "C", "D": "D"}, "answer_idx": "B",
         "answer": "B12"},
    ])
    qs = mcq.read_questions("medqa", path)
    assert [q.answer for q in qs] == [2, 1] and qs[0].options[3] == "Costochondritis"
    prompt = mcq.mcq_prompt(qs[0])
    assert prompt == formats.mcq_prompt("A 45-year-old man has chest pain.", ["MI", "GERD", "PE", "Costochondritis"])
    assert "\nA. MI\nB. GERD\nC. PE\nD. Costochondritis\n" in prompt and prompt.endswith("Answer:\n")
    assert ev.mcq_answer(qs[0]) == "C"


def test_medmcqa_cop_numbering_is_detected(tmp_path):
    base = {"question": "Drug of choice?", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}
    one_based = write(tmp_path / "orig.jsonl", [{**base, "cop": 4}, {**base, "cop": 1}])
    zero_based = write(tmp_path / "hf.jsonl", [{**base, "cop": 0}, {**base, "cop": 3}, {**base, "cop": -1}])
    ambiguous = write(tmp_path / "amb.jsonl", [{**base, "cop": 2}])
    both = write(tmp_path / "both.jsonl", [{**base, "cop": 0}, {**base, "cop": 4}])
    assert [q.answer for q in mcq.read_questions("medmcqa", one_based)] == [3, 0]
    assert [q.answer for q in mcq.read_questions("medmcqa", zero_based)] == [0, 3, None]
    notes: list[str] = []
    assert [q.answer for q in mcq.read_questions("medmcqa", ambiguous, notes)] == [2]  # as data prepare reads it
    assert "read as 0-3" in notes[0]
    with pytest.raises(SpecError, match="cop takes both 0 and 4"):
        mcq.read_questions("medmcqa", both)


def test_pubmedqa_formats(tmp_path):
    jsonl = write(tmp_path / "pqa.jsonl", [
        {"pubid": 1, "question": "Does X help?", "context": {"contexts": ["First.", "Second."], "labels": ["A", "B"]},
         "final_decision": "yes"},
        {"question": "Is Y safe?", "context": ["Only one."], "final_decision": "maybe"},
        {"question": "Z?", "context": "Plain string.", "final_decision": "No"},
    ])
    original = tmp_path / "ori_pqal.json"
    original.write_text(json.dumps({"21645374": {"QUESTION": "Do mitochondria matter?", "CONTEXTS": ["Ctx."],
                                                 "final_decision": "no", "LONG_ANSWER": "..."}}))
    qs = mcq.read_questions("pubmedqa", jsonl)
    assert [q.answer for q in qs] == [0, 2, 1]
    assert qs[0].context == "First.\nSecond." and qs[2].context == "Plain string."
    assert mcq.mcq_prompt(qs[1]) == formats.mcq_prompt("Is Y safe?", ["yes", "no", "maybe"], "Only one.")
    (q,) = mcq.read_questions("pubmedqa", original)
    assert (q.question, q.context, q.answer) == ("Do mitochondria matter?", "Ctx.", 1)


def test_each_format_evaluates_through_the_cli(cli, base_model, tmp_path):
    files = {
        "medqa": write(tmp_path / "m.jsonl", [{"sent1": "Q?", "ending0": "a", "ending1": "b", "ending2": "c",
                                               "ending3": "d", "label": i} for i in range(4)]),
        "medmcqa": write(tmp_path / "mc.jsonl", [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
                                                  "cop": i} for i in (1, 2, 3, 4)]),
        "pubmedqa": write(tmp_path / "p.jsonl", [{"question": "Q?", "context": "C.", "final_decision": d}
                                                 for d in ("yes", "no", "maybe")]),
    }
    for task, path in files.items():
        for extra in ([], ["--generate", "--max-new-tokens", "2"], ["--score", "text"]):
            code, stdout, stderr = cli("eval", "--model", str(base_model), "--task", task, "--data", str(path),
                                       "--batch-size", "2", "--json", *extra)
            assert code == 0, (task, extra, stderr)
            result = json.loads(stdout)
            n = 3 if task == "pubmedqa" else 4
            assert result["n"] == result["n_labelled"] == sum(result["choices"].values()) == n
            assert 0 <= result["accuracy"] <= 1 and result["task"] == task
            assert sum(result["gold"].values()) == n


def test_few_shot_prompt_and_shots_file(cli, tuned_model, toy):
    shots = mcq.read_questions("medqa", toy["train"])[:2]
    q = toy_questions(1, seed=9)[0]
    prompt = ev.few_shot_prompt(q, shots)
    assert prompt.startswith(mcq.mcq_prompt(shots[0]) + ev.mcq_answer(shots[0]) + "\n\n")
    assert prompt.endswith(mcq.mcq_prompt(q)) and prompt.count("Answer:") == 3
    code, stdout, stderr = cli("eval", "--model", str(tuned_model), "--task", "medqa", "--data", str(toy["test"]),
                               "--shots", "2", "--shots-file", str(toy["train"]), "--limit", "8", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["shots"] == 2


@pytest.mark.parametrize("args, message", [
    (["--task", "usmle"], "--task 'usmle' is not known"),
    (["--shots", "2"], "--shots 2: needs --shots-file"),
    (["--score", "mean"], "--score 'mean'"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    (["--bad-line"], ":2: not valid JSON"),
    (["--no-field"], "no 'opa' field; --task medmcqa expects MedMCQA records"),
])
def test_bad_eval_input_is_one_line_and_exit_2(cli, base_model, tmp_path, args, message):
    data = write(tmp_path / "ok.jsonl", [{"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}])
    if args == ["--bad-line"]:
        data.write_text(data.read_text() + "{oops\n")
        args = []
    elif args == ["--no-field"]:
        write(data, [{"question": "Q?", "cop": 1}])
        args = []
    full = {"--task": "medmcqa", "--data": str(data)}
    for flag, value in zip(args[::2], args[1::2]):
        full[flag] = value
    code, stdout, stderr = cli("eval", "--model", str(base_model), *[x for kv in full.items() for x in kv])
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1
    assert stdout == ""


def test_model_dir_errors(cli, tmp_path, base_model):
    data = write(tmp_path / "d.jsonl", [{"question": "Q?", "context": "C", "final_decision": "yes"}])
    code, _, stderr = cli("eval", "--model", str(tmp_path), "--task", "pubmedqa", "--data", str(data))
    assert code == 2 and "no config.json there" in stderr
    code, _, stderr = cli("eval", "--model", str(base_model), "--adapter", str(tmp_path), "--task", "pubmedqa",
                          "--data", str(data))
    assert code == 2 and "no adapter_config.json there" in stderr


# --- parsing generated answers ---

@pytest.mark.parametrize("text, expected", [
    (" B", 1), ("B.", 1), ("(C) because", 2), ("D) Costochondritis", 3), (" C\n", 2),
    ("The answer is B.", 1), ("the answer is (d)", 3), ("the answer is a beta blocker", None),
    ("Answer: C", 2), ("answer: (A)", 0),
    ("I think the correct option is D, since", 3), ("Let me think. (B) fits best", 1),
    ("It is GERD", 1), ("pulmonary embolism", None), ("E.", None), ("", None),
    ("A 45-year-old... so the answer is C", 2),
])
def test_parse_choice_letters(text, expected):
    assert ev.parse_choice(text, ("MI", "GERD", "PE", "Costochondritis")) == expected


@pytest.mark.parametrize("text, expected", [
    (" yes", 0), ("No, it does not.", 1), ("maybe", 2), ("B", 1), ("Yes. There is no evidence", 0),
    ("not known", None), ("The answer is C", 2),
])
def test_parse_choice_pubmedqa(text, expected):
    assert ev.parse_choice(text, mcq.PUBMEDQA_OPTIONS) == expected


def test_a_data_file_of_wrong_bytes_is_refused_by_name(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(SpecError, match=f"--data {path}: not UTF-8 text"):
        mcq.read_questions("medqa", path)


@pytest.mark.parametrize("task, record, says", [
    ("medmcqa", {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1.5}, "cop 1.5 is not"),
    ("medmcqa", {"question": "q", "opa": ["a"], "opb": "b", "opc": "c", "opd": "d", "cop": 1}, "opa is list"),
    ("medmcqa", {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": True}, "cop True is not"),
    ("medqa", {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "G"}, "answer_idx 'G' is not one"),
    ("medqa", {"sent1": {"q": 1}, "ending0": "a", "ending1": "b", "label": 0}, "the question is dict"),
    ("medqa", {"sent1": "q", "ending0": "a", "ending1": "b", "label": float("nan")}, "label nan is not"),
    ("pubmedqa", {"question": None, "context": "c", "final_decision": "yes"}, "question is null"),
])
def test_wrong_types_in_a_record_are_refused_not_coerced(tmp_path, task, record, says):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(SpecError, match=f"{path}:1: {says}"):
        mcq.read_questions(task, path)
