"""Multiple-choice evaluation (MedQA-USMLE, MedMCQA, PubMedQA) and generation.

The questions and their prompt come from llamajobs/questions.py. Text is tokenised as `data prepare`
tokenises it: with sentencepiece when the model directory has a tokenizer.model, else with its
Hugging Face tokenizer; prompt and answer are encoded together and the prompt's tokens are the
prefix (`encode`), BOS first.

Scoring (`score="letter"`, the default): the log-likelihood of each option's letter after the prompt.
Every letter is one token after the newline, so one forward pass over the prompt scores all options
of a question, and a batch of prompts shares one forward. `score="text"`: the log-likelihood (summed
over its tokens) of the option's text after the prompt; all options of a batch of questions go
through one forward. Options whose continuation is more than one token take that path too.
`generate=True`: greedy decoding, then `parse_choice` finds the letter.

As a job (`eval --cluster`), llamajobs/worker/evaluate.py runs `score_questions` on each rank's share
of the questions and `summarize` on the gathered whole: the same result as `evaluate` here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from llamajobs.data.formats import LETTERS
from llamajobs.errors import SpecError
from llamajobs.questions import Question, few_shot_prompt, mcq_answer, parse_choice, read_questions
from llamajobs.values import device_type

if TYPE_CHECKING:
    from llamajobs.spec import EvalSpec


class TextEncoder:
    """A model directory's tokenizer, used as `data prepare` uses it: sentencepiece itself when there
    is a tokenizer.model (the ids training saw), else the Hugging Face tokenizer. No special tokens
    are added by `encode`; `decode` drops them."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.sp = self.hf = None
        from llamajobs.data.encoder import is_sentencepiece

        spm_model = path / "tokenizer.model"
        if spm_model.is_file() and (is_sentencepiece(spm_model) or not (path / "tokenizer.json").is_file()):
            import sentencepiece as spm

            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise SpecError(f"{path / 'tokenizer.model'}: not a sentencepiece model ({e})") from None
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        elif (path / "tokenizer.json").is_file():
            from llamajobs.data.tokenizer import load_tokenizer

            from llamajobs.data.encoder import document_start

            self.hf = load_tokenizer(path)
            self.bos_id, self.eos_id = document_start(self.hf), self.hf.eos_token_id
        else:
            raise SpecError(f"{path}: no tokenizer.model or tokenizer.json; expected an HF LLaMA directory")
        if self.bos_id is None or self.bos_id < 0 or self.eos_id is None or self.eos_id < 0:
            raise SpecError(f"{path}: the tokenizer has no EOS token; a causal LM's tokenizer has one")

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=True)


def encode(tokenizer: TextEncoder, prompt: str, answer: str = "") -> tuple[list[int], list[int]]:
    """Token ids of the prompt (BOS first) and of the answer, as data prepare splits them: prompt +
    answer encoded together, the prompt's tokens the prefix. Training: labels on the answer ids
    followed by EOS, BOS and the prompt masked."""
    prompt_ids, (answer_ids,) = encode_options(tokenizer, prompt, [answer])
    return prompt_ids, answer_ids


def encode_options(tokenizer: TextEncoder, prompt: str, answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """`encode` for several answers to one prompt, in one (batched) tokenizer call."""
    first, *rest = tokenizer.encode([prompt, *(prompt + a for a in answers)])
    prompt_ids = [tokenizer.bos_id, *first]
    answer_ids = []
    for answer, ids in zip(answers, rest):
        if ids[: len(first)] == first:
            answer_ids.append(ids[len(first):])
        else:  # the tokenizer merged across the boundary (not after the template's newline)
            answer_ids.append(tokenizer.encode([answer])[0])
    return prompt_ids, answer_ids


# --- the model ---


def resolve_device(device: str = "auto") -> Any:
    import torch

    return torch.device(device_type(device, torch.cuda.is_available()))  # (the worker's rule)


def adapter_base(adapter: Path) -> Path:
    """The base model directory of a LoRA adapter (a LoRA run's final/): llamajobs.json's base_weights,
    else adapter_config.json's base_model_name_or_path, when that is a directory here."""
    candidates = []
    provenance = adapter / "llamajobs.json"
    if provenance.is_file():
        candidates.append(json.loads(provenance.read_text()).get("base_weights"))
    candidates.append(json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path"))
    for base in candidates:
        if base and (Path(base) / "config.json").is_file():
            return Path(base)
    raise SpecError(f"--model {adapter} holds a LoRA adapter whose base model is not a directory here; pass the "
                    f"base as --model and {adapter} as --adapter (or the merged model, final/merged)")


def load_model(model_dir: str | Path, adapter: str | Path | None = None, device: str = "auto"
               ) -> tuple[Any, TextEncoder]:
    """(model, tokenizer) in eval mode: an HF LLaMA directory, plus a peft LoRA adapter if given.
    fp32 on CPU, bf16 on GPU. A LoRA run's final/ as --model is read as its base plus the adapter."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # "Loading weights" bars would litter logs and piped stderr

    model_dir, adapter, tokenizer_dir = resolve_model(model_dir, adapter)
    tokenizer = TextEncoder(tokenizer_dir)
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    if adapter is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
    return model.to(target).eval(), tokenizer


def resolve_model(model_dir: str | Path, adapter: str | Path | None = None) -> tuple[Path, Path | None, Path]:
    """(model dir, adapter dir, tokenizer dir) after checking the directories, without loading
    anything: `eval --cluster` refuses a wrong path before it queues a job."""
    model_dir = Path(model_dir)
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        if adapter is not None:
            raise SpecError(f"--model {model_dir} holds a LoRA adapter, and --adapter was given too; "
                            f"pass the base as --model")
        model_dir, adapter = adapter_base(model_dir), model_dir
    if not (model_dir / "config.json").is_file():
        raise SpecError(f"--model {model_dir}: no config.json there; expected an HF LLaMA directory "
                        f"(`llamajobs convert` output, a run's final/ or final/merged)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise SpecError(f"--adapter {adapter}: no adapter_config.json there; expected a LoRA run's final/")
    tokenizer_dir = next((Path(d) for d in (model_dir, adapter) if d is not None and _has_tokenizer(Path(d))), None)
    if tokenizer_dir is None:
        raise SpecError(f"--model {model_dir}: no tokenizer there (tokenizer.json or tokenizer.model)")
    return model_dir, None if adapter is None else Path(adapter), tokenizer_dir


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def _max_len(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def _left_pad(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """input_ids, attention_mask and position_ids (0 at each row's first real token) for left padding."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _truncate(prompt: list[int], room: int) -> tuple[list[int], bool]:
    """Keep BOS and the end of a prompt that does not fit (the question and "### Answer:" are at its end)."""
    if len(prompt) <= room:
        return prompt, False
    return [prompt[0], *prompt[len(prompt) - room + 1:]], True


def option_scores(model: Any, tokenizer: TextEncoder, prompts: list[str], options: list[list[str]],
                  batch_size: int = 8) -> tuple[list[list[float]], int]:
    """Log-likelihood of each option continuation after its prompt, and how many prompts were
    truncated to fit the model. Single-token continuations: one forward over the prompt per
    question (batched); longer ones: prompt + option rows, all options of a batch in one forward."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.eos_id  # any id: padding is masked (and cut from generations)
    encoded = []
    for prompt, conts in zip(prompts, options):
        encoded.append(encode_options(tokenizer, prompt, conts))
    scores: list[list[float] | None] = [None] * len(prompts)
    truncated = 0
    single = [i for i, (_, conts) in enumerate(encoded) if all(len(c) == 1 for c in conts)]
    multi = sorted(set(range(len(prompts))) - set(single))
    with torch.inference_mode():
        for start in range(0, len(single), batch_size):
            batch = single[start:start + batch_size]
            rows = []
            for i in batch:
                row, cut = _truncate(encoded[i][0], _max_len(model))
                rows.append(row)
                truncated += cut
            ids, mask, positions = _left_pad(rows, pad, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits
            logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
            for row, i in enumerate(batch):
                targets = torch.tensor([c[0] for c in encoded[i][1]], device=device)
                scores[i] = logprobs[row, targets].tolist()
        for start in range(0, len(multi), batch_size):
            batch = multi[start:start + batch_size]
            rows, conts, owners = [], [], []
            for i in batch:
                prompt_ids, cont_ids = encoded[i]
                longest = max(map(len, cont_ids))
                prompt_ids, cut = _truncate(prompt_ids, _max_len(model) - longest)
                truncated += cut
                for c in cont_ids:
                    rows.append(prompt_ids + c)
                    conts.append(c)
                    owners.append(i)
            keep = max(map(len, conts)) + 1
            ids, mask, positions = _left_pad(rows, pad, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, (c, i) in enumerate(zip(conts, owners)):
                # Left padding aligns every row's end: the continuation's tokens are the last len(c);
                # kept logit j predicts the token at kept position j + 1.
                at = torch.arange(keep - len(c) - 1, keep - 1, device=device)
                total = logprobs[row, at, torch.tensor(c, device=device)].sum().item()
                if scores[i] is None:
                    scores[i] = []
                scores[i].append(total)
    return scores, truncated  # type: ignore[return-value]


def generate_texts(model: Any, tokenizer: TextEncoder, prompts: list[str], *, max_new_tokens: int = 32,
                   temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
    """The continuation of each prompt (greedy unless temperature > 0), special tokens dropped."""
    import torch

    device = next(model.parameters()).device
    if max_new_tokens >= _max_len(model) - 1:
        raise SpecError(f"--max-new-tokens {max_new_tokens}: leaves no room for the prompt in the model's "
                        f"{_max_len(model)} positions")
    pad = tokenizer.eos_id  # any id: padding is masked (and cut from generations)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    texts = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            rows = [_truncate(encode(tokenizer, p)[0], _max_len(model) - max_new_tokens)[0]
                    for p in prompts[start:start + batch_size]]
            ids, mask, _ = _left_pad(rows, pad, device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_id, **sampling)
            for row in out[:, ids.shape[1]:].tolist():
                texts.append(tokenizer.decode(row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row))
    return texts


# --- evaluation ---


def run_eval(model: Any, tokenizer: TextEncoder, questions: list[Question], *, shots: Sequence[Question] = (),
             generate: bool = False, score: str = "letter", batch_size: int = 8,
             max_new_tokens: int = 16) -> dict:
    """Accuracy, n and the per-option choice counts (plus per-question details under "predictions").
    The options are an EvalSpec's, validated where it was made (rules.validate_eval)."""
    started = time.perf_counter()
    choices, details, truncated = score_questions(model, tokenizer, questions, shots=shots, generate=generate,
                                                  score=score, batch_size=batch_size, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - started
    return summarize(questions, choices, details, seconds=seconds, truncated=truncated,
                     mode=eval_mode(generate, score))


def score_questions(model: Any, tokenizer: TextEncoder, questions: list[Question], *,
                    shots: Sequence[Question] = (), generate: bool = False, score: str = "letter",
                    batch_size: int = 8, max_new_tokens: int = 16
                    ) -> tuple[list[int | None], list[dict], int]:
    """Each question's chosen option (None: a generation with no letter found), its details (the
    option scores or the generated text) and how many prompts were truncated. The eval worker runs
    this on each rank's share of the questions; `summarize` turns the whole set into the result."""
    prompts = [few_shot_prompt(q, shots) for q in questions]
    truncated = 0
    if generate:
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
        choices: list[int | None] = [parse_choice(t, q.options) for t, q in zip(texts, questions)]
        details: list[dict] = [{"generated": t} for t in texts]
    else:
        conts = [[mcq_answer(q, i) if score == "letter" else o for i, o in enumerate(q.options)]
                 for q in questions]
        scores, truncated = option_scores(model, tokenizer, prompts, conts, batch_size)
        choices = [max(range(len(s)), key=s.__getitem__) for s in scores]
        details = [{"scores": [round(x, 4) for x in s]} for s in scores]
    return choices, details, truncated


def eval_mode(generate: bool, score: str) -> str:
    return "generate" if generate else f"loglik-{score}"


def summarize(questions: list[Question], choices: list[int | None], details: list[dict], *, seconds: float,
              truncated: int, mode: str) -> dict:
    width = max((len(q.options) for q in questions), default=0)
    counts = {letter: 0 for letter in LETTERS[:width]}
    gold = dict(counts)
    labelled = correct = 0
    predictions = []
    for q, choice, detail in zip(questions, choices, details):
        if choice is None:
            counts["unparsed"] = counts.get("unparsed", 0) + 1
        else:
            counts[LETTERS[choice]] += 1
        if q.answer is not None:
            labelled += 1
            gold[LETTERS[q.answer]] += 1
            correct += choice == q.answer
        predictions.append({"gold": None if q.answer is None else LETTERS[q.answer],
                            "choice": None if choice is None else LETTERS[choice], **detail})
    return {"mode": mode, "n": len(questions), "n_labelled": labelled, "correct": correct,
            "accuracy": correct / labelled if labelled else None, "choices": counts, "gold": gold,
            "truncated": truncated, "seconds": round(seconds, 3),
            "questions_per_s": round(len(questions) / seconds, 2) if seconds > 0 else None,
            "predictions": predictions}


@dataclass(frozen=True, slots=True)
class Inputs:
    questions: list[Question]
    shots: list[Question]
    notes: list[str]  # what reading the files decided, for the user (e.g. MedMCQA's cop numbering)


def read_inputs(options: EvalSpec) -> Inputs:
    """The questions (the first --limit) and the K shots. `eval --cluster` reads them on the login
    node too, so a bad file is refused before anything is queued."""
    notes: list[str] = []
    questions = read_questions(options.task, options.data, notes)[:options.limit]
    if not questions:
        raise SpecError(f"--data {options.data}: no questions in it")
    shots = load_shots(options.task, options.shots, options.shots_file, notes)
    return Inputs(questions=questions, shots=shots, notes=notes)


def scoring_options(options: EvalSpec) -> dict[str, Any]:
    """The keyword arguments of run_eval and score_questions that come from the spec."""
    return {"generate": options.generate, "score": options.score, "batch_size": options.batch_size,
            "max_new_tokens": options.max_new_tokens}


def evaluate(options: EvalSpec, device: str = "auto") -> tuple[EvalResult, list[dict]]:
    """Read the questions (and the K shots), load the model, score; the CLI's in-process `eval`: the
    result and the per-question predictions."""
    inputs = read_inputs(options)
    model, tokenizer = load_model(options.model, options.adapter, device)
    return report(options, inputs, run_eval(model, tokenizer, inputs.questions, shots=inputs.shots,
                                            **scoring_options(options)))


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalResult:
    """What `eval --json` prints and an eval job's eval.json holds (the per-question predictions go
    to their own file). Fields in the order of the document's keys (CLI.md; frozen by
    tests/test_result_snapshots.py)."""
    task: str
    data: str | None
    model: str | None
    adapter: str | None
    shots: int
    mode: str  # eval_mode()
    n: int
    n_labelled: int
    correct: int
    accuracy: float | None  # None without labelled questions
    choices: dict[str, int]  # letter (or "unparsed") -> how often chosen
    gold: dict[str, int]  # letter -> how often the answer
    truncated: int  # prompts cut to fit the model
    seconds: float
    questions_per_s: float | None
    notes: tuple[str, ...]  # what reading the files decided (MedMCQA's numbering)
    world_size: int | None = None  # a job's processes; not in the in-process document

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["notes"] = list(self.notes)
        if self.world_size is None:
            del doc["world_size"]
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> EvalResult | None:
        """An eval.json read back; None when it is not one (damaged, or another kind of result)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(doc, dict) or not all(k in doc for k in names if k != "world_size"):
            return None
        try:
            result = cls(**{k: doc[k] for k in names if k in doc})
        except TypeError:
            return None
        ok = (isinstance(result.choices, dict) and isinstance(result.gold, dict) and isinstance(result.notes, list)
              and all(map(_number, (result.n, result.n_labelled, result.correct, result.accuracy,
                                    result.questions_per_s))))
        return dataclasses.replace(result, notes=tuple(map(str, result.notes))) if ok else None


def _number(value: Any) -> bool:
    """None or a finite number (a damaged file may hold 1e999 or an integer no float holds)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def report(options: EvalSpec, inputs: Inputs, scored: dict) -> tuple[EvalResult, list[dict]]:
    """The result of `summarize`'s counts for these options and inputs, and the per-question predictions."""
    counts = {k: v for k, v in scored.items() if k != "predictions"}
    return (EvalResult(task=options.task, data=options.data, model=options.model, adapter=options.adapter,
                       shots=len(inputs.shots), **counts, notes=tuple(inputs.notes)), scored["predictions"])


def load_shots(task: str, shots: int, shots_file: str | Path | None, notes: list[str] | None = None) -> list[Question]:
    """The first K labelled questions of --shots-file (in the task's format; rules.validate_eval has
    checked that K >= 0 and that a file is given when K > 0)."""
    if shots == 0:
        return []
    labelled = [q for q in read_questions(task, shots_file, notes, flag="--shots-file") if q.answer is not None]
    if len(labelled) < shots:
        raise SpecError(f"--shots {shots}: --shots-file {shots_file} has only {len(labelled)} labelled questions")
    return labelled[:shots]


def continue_prompt(model_dir: str | Path, prompt: str, *, adapter: str | Path | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, device: str = "auto") -> str:
    """The model's continuation of the prompt, as given (nothing appended); greedy unless temperature > 0."""
    import torch

    if max_new_tokens < 1:
        raise SpecError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise SpecError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise SpecError(f"--top-p {top_p}: must be in (0, 1]")
    model, tokenizer = load_model(model_dir, adapter, device)
    torch.manual_seed(seed)
    return generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, batch_size=1)[0]


def write_predictions(path: str | Path, predictions: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(predictions):
            f.write(json.dumps({"index": i, **p}) + "\n")


def check_writable(path: Path, flag: str) -> None:
    """Refuse a file we could not write, before the work whose result goes there: tried, not
    guessed from the permission bits (root passes those, a read-only filesystem does not)."""
    existed = path.exists()
    if path.is_dir():
        raise SpecError(f"{flag} {path}: a directory; give a file name")
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise SpecError(f"{flag} {path}: cannot be written ({e.strerror})") from None
    if not existed:
        path.unlink()
