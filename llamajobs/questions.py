"""The multiple-choice sets `eval` scores (MedQA-USMLE, MedMCQA, PubMedQA): reading them into
Questions, the prompt training uses for them, and finding the letter in a generated answer.

The prompt is `llamajobs.data.formats.mcq_prompt` (a header line, the context for PubMedQA,
"### Question:", the lettered options, "### Answer:" and a newline), and the answer is the letter
alone (`mcq_answer`); PubMedQA's options are A. yes, B. no, C. maybe.

Data files: JSON lines, a JSON list, or a JSON dict of id -> record (PubMedQA's ori_pqal.json).
Each record is parsed by llamajobs/data/mcq.py, the one parser per set that `data prepare` uses too
(its docstring lists the layouts and how MedMCQA's cop numbering is decided).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from llamajobs.catalog import TASKS
from llamajobs.data import mcq
from llamajobs.data.formats import mcq_prompt as render_mcq_prompt
from llamajobs.data.mcq import LETTERS, PUBMEDQA_OPTIONS, Question
from llamajobs.errors import SpecError

__all__ = ["LETTERS", "PUBMEDQA_OPTIONS", "Question", "few_shot_prompt", "mcq_answer", "mcq_prompt", "parse_choice",
           "read_questions", "read_records"]




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


def _question(task: str, where: str, parse, *args) -> Question:
    try:
        return parse(*args)
    except mcq.BadRecord as e:
        raise SpecError(f"{where}: {e}; --task {task} expects {FORMATS[task]}") from None


def _medmcqa(records: list[tuple[str, dict]], notes: list[str]) -> list[Question]:
    """The file's cop numbering first (mcq.medmcqa_numbering), then each record with it."""
    cops = [(where, _question("medmcqa", where, mcq.medmcqa_cop, record)) for where, record in records]
    try:
        base, note = mcq.medmcqa_numbering(cops)
    except mcq.NumberingError as e:
        raise SpecError(f"{e.where}: {e}") from None
    if note:
        notes.append(note)
    return [_question("medmcqa", where, mcq.medmcqa, record, base) for where, record in records]


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
    parse = mcq.medqa if task == "medqa" else mcq.pubmedqa
    return [_question(task, where, parse, record) for where, record in records]


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
