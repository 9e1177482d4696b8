"""The multiple-choice sets `eval` scores (MedQA-USMLE, MedMCQA, PubMedQA): reading them into
Questions, the prompt training uses for them, and finding the letter in a generated answer.

The prompt is `llamajobs.data.formats.mcq_prompt` (a header line, the context for PubMedQA,
"### Question:", the lettered options, "### Answer:" and a newline), and the answer is the letter
alone (`mcq_answer`); PubMedQA's options are A. yes, B. no, C. maybe.

Data formats (JSONL, a JSON list, or for PubMedQA also the original dict of id -> record):
  medqa     MedQA-USMLE as on the Hugging Face hub: sent1 (+ sent2), ending0..ending3 (ending4), label
            0-3 (or a letter); or the original release: question, options {"A": ..}, answer_idx "A".
  medmcqa   question, opa, opb, opc, opd, cop. The original release (Kaggle/GitHub JSON lines) numbers
            cop 1-4; the Hugging Face dataset 0-3. Decided per file, as `data prepare` does: a 4 and no
            0 means 1-4, anything else 0-3 (both 0 and 4: an error). A file with only 1-3 is read as
            0-3 and the notes say so. cop -1 or missing (the unlabelled test split) counts the choice
            but not the accuracy.
  pubmedqa  question (or QUESTION), context: a string, a list of strings (joined by newlines), or
            {"contexts": [...]} (or CONTEXTS), final_decision yes/no/maybe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llamajobs.catalog import TASKS
from llamajobs.data.formats import LETTERS, mcq_prompt as render_mcq_prompt
from llamajobs.errors import SpecError

PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


@dataclass(frozen=True, kw_only=True, slots=True)
class Question:
    question: str
    options: tuple[str, ...]
    answer: int | None  # index into options; None when the set carries no label
    context: str | None = None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]




def mcq_prompt(q: Question) -> str:
    """The training prompt of one question (llamajobs.data.formats.mcq_prompt), ending in a newline."""
    return render_mcq_prompt(q.question, list(q.options), q.context or "")


def mcq_answer(q: Question, index: int | None = None) -> str:
    """The response that answers with option `index` (default: the gold one): the letter alone."""
    index = q.answer if index is None else index
    if index is None:
        raise ValueError("the question has no gold answer")
    return LETTERS[index]


def few_shot_prompt(q: Question, shots: Sequence[Question] = ()) -> str:
    """K solved examples (prompt and gold answer, a blank line after each), then the question."""
    return "".join(mcq_prompt(s) + mcq_answer(s) + "\n\n" for s in shots) + mcq_prompt(q)



# --- reading the data sets ---


def read_records(path: str | Path, flag: str = "--data") -> list[tuple[str, dict]]:
    """(where, record) pairs: JSONL, a JSON list, or a JSON dict of id -> record; where is file:line or file:id."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{flag} {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSON lines") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [(f"{path}:[{i}]", r) for i, r in enumerate(whole)]
    if isinstance(whole, dict):
        if whole and all(isinstance(v, dict) for v in whole.values()):  # PubMedQA's ori_pqal.json
            return [(f"{path}:{key}", value) for key, value in whole.items()]
        return [(f"{path}:1", whole)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}:{number}: not valid JSON ({e.msg}); expected JSON lines") from None
    return records


def _field(record: dict, where: str, task: str, *names: str, required: bool = True) -> Any:
    for name in names:
        if name in record:
            return record[name]
    if required:
        raise SpecError(f"{where}: no {names[0]!r} field; --task {task} expects {FORMATS[task]}")
    return None


def _text(value: Any, where: str, name: str) -> str:
    """A text field: a string (a number is read as its digits); a list, an object or null is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SpecError(f"{where}: {name} is {'null' if value is None else type(value).__name__}, expected text")
    return str(value)


def _integer(value: Any, where: str, name: str, expected: str) -> int:
    """A whole number (or its digits as a string): 1.5, true or "x" are refused, never rounded."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise SpecError(f"{where}: {name} {value!r} is not {expected}")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise SpecError(f"{where}: {name} {value!r} is not {expected}") from None


def _medqa(record: dict, where: str) -> Question:
    if "sent1" in record or "ending0" in record:
        question = _field(record, where, "medqa", "sent1")
        if record.get("sent2"):
            question = f"{question} {record['sent2']}"
        options = []
        while f"ending{len(options)}" in record:
            options.append(record[f"ending{len(options)}"])
        label = _field(record, where, "medqa", "label", required=False)
        answer = None if label is None or label == -1 else _index(label, len(options), where, "label", 0)
    else:  # the original release: question, options {"A": ...}, answer_idx
        question = _field(record, where, "medqa", "question")
        opts = _field(record, where, "medqa", "options")
        if not isinstance(opts, dict):
            raise SpecError(f"{where}: 'options' must map letters to texts; --task medqa expects {FORMATS['medqa']}")
        keys = sorted(opts)
        options = [opts[k] for k in keys]
        idx = record.get("answer_idx")
        if idx is not None and idx not in keys:
            raise SpecError(f"{where}: answer_idx {idx!r} is not one of the options {', '.join(map(str, keys))}")
        answer = None if idx is None else keys.index(idx)
    if len(options) < 2:
        raise SpecError(f"{where}: fewer than two options; --task medqa expects {FORMATS['medqa']}")
    return Question(question=_text(question, where, "the question"),
                    options=tuple(_text(o, where, f"option {i}") for i, o in enumerate(options)), answer=answer)


def _index(value: Any, n: int, where: str, name: str, base: int) -> int:
    """An option index from a number (counted from base) or a letter."""
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n] and len(value.strip()) == 1:
        return LETTERS.index(value.strip().upper())
    index = _integer(value, where, name, "an option number or letter") - base
    if not 0 <= index < n:
        raise SpecError(f"{where}: {name} {value!r} is out of range ({base} to {n - 1 + base})")
    return index


def _medmcqa(records: list[tuple[str, dict]], notes: list[str]) -> list[Question]:
    cops = []
    for where, r in records:
        cop = _field(r, where, "medmcqa", "cop", required=False)
        cop = None if cop is None else _integer(cop, where, "cop", "an option number (0-3 or 1-4)")
        cops.append(None if cop is None or cop < 0 else cop)
    seen = {c for c in cops if c is not None}
    if 0 in seen and 4 in seen:
        raise SpecError(f"{records[0][0].rsplit(':', 1)[0]}: cop takes both 0 and 4; expected 0-3 (Hugging Face) "
                        f"or 1-4 (original release) throughout the file")
    base = 1 if 4 in seen else 0  # the rule of `data prepare` (llamajobs.data.formats.MedMCQA.scan)
    if seen and not seen & {0, 4}:
        notes.append("medmcqa: cop only took values 1-3; read as 0-3 (Hugging Face numbering), as data prepare does")
    questions = []
    for (where, r), cop in zip(records, cops):
        options = tuple(_text(_field(r, where, "medmcqa", key), where, key) for key in ("opa", "opb", "opc", "opd"))
        answer = None if cop is None else _index(cop, 4, where, "cop", base)
        question = _text(_field(r, where, "medmcqa", "question"), where, "question")
        questions.append(Question(question=question, options=options, answer=answer))
    return questions


def _pubmedqa(record: dict, where: str) -> Question:
    question = _field(record, where, "pubmedqa", "question", "QUESTION")
    context = _field(record, where, "pubmedqa", "context", "CONTEXTS", "contexts", required=False)
    if isinstance(context, dict):
        context = context.get("contexts", context.get("CONTEXTS"))
    if isinstance(context, list):
        context = "\n".join(map(str, context))
    decision = _field(record, where, "pubmedqa", "final_decision", required=False)
    answer = None
    if decision is not None:
        decision = str(decision).strip().lower()
        if decision not in PUBMEDQA_OPTIONS:
            raise SpecError(f"{where}: final_decision {decision!r}; expected yes, no or maybe")
        answer = PUBMEDQA_OPTIONS.index(decision)
    return Question(question=_text(question, where, "question"), options=PUBMEDQA_OPTIONS, answer=answer,
                    context=str(context) if context else None)


FORMATS = {
    "medqa": "MedQA-USMLE records (sent1, ending0-ending3, label 0-3; or question, options, answer_idx)",
    "medmcqa": "MedMCQA records (question, opa, opb, opc, opd, cop 0-3 or 1-4)",
    "pubmedqa": "PubMedQA records (question, context, final_decision yes/no/maybe)",
}


def read_questions(task: str, path: str | Path, notes: list[str] | None = None, flag: str = "--data"
                   ) -> list[Question]:
    """The questions of a data file in the task's format (see the module docstring)."""
    if task not in TASKS:
        raise SpecError(f"--task {task!r} is not known; choose one of {', '.join(TASKS)}")
    notes = [] if notes is None else notes
    records = read_records(path, flag)
    for where, record in records:
        if not isinstance(record, dict):
            raise SpecError(f"{where}: expected a JSON object; --task {task} expects {FORMATS[task]}")
    if task == "medmcqa":
        return _medmcqa(records, notes)
    reader = _medqa if task == "medqa" else _pubmedqa
    return [reader(record, where) for where, record in records]


# --- parsing a generated answer ---

_EXPLICIT = re.compile(  # "answer is B", "Answer: (b)", "option D": a lower-case letter only in parentheses
    r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*(?:\(([A-Ja-j])\)|([A-J])(?![A-Za-z]))")
_LEADING = re.compile(r"^\s*\(?([A-J])\)?(?=$|[\s.,:;)\]])")
_PAREN = re.compile(r"\(([A-J])\)")
_LOOSE = re.compile(r"(?<![A-Za-z])([A-J])[.):](?=\s|$)")


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option a generated answer chose, or None. In order: "the answer is B" / "Answer: (b)" /
    "option B"; a letter at the start ("B", "B.", "(B)", "B)"); "(B)" anywhere; the option whose text
    appears first (whole words, case-insensitive: "yes"/"no"/"maybe" for PubMedQA); "B." or "B)"
    anywhere. Letters beyond the question's options are ignored."""
    letters = LETTERS[: len(options)]
    for pattern in (_EXPLICIT, _LEADING, _PAREN):
        for match in pattern.finditer(text):
            letter = next(g for g in match.groups() if g).upper()
            if letter in letters:
                return letters.index(letter)
    found = []
    for i, option in enumerate(options):
        option = option.strip()
        if option:
            match = re.search(rf"(?<!\w){re.escape(option)}(?!\w)", text, re.IGNORECASE)
            if match:
                found.append((match.start(), -len(option), i))
    if found:
        return min(found)[2]
    for match in _LOOSE.finditer(text):
        if match.group(1) in letters:
            return letters.index(match.group(1))
    return None
