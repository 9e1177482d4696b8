"""The multiple-choice sets, one parser each: MedQA-USMLE, MedMCQA and PubMedQA records into a
Question. `data prepare` (data/formats.py: the question rendered into a training example) and `eval`
(questions.py: the question scored) both read records through these functions, so a record means
the same question, options and answer to both.

Layouts accepted (the union of what either command read before they shared a parser):
  medqa     The Hugging Face MedQA-USMLE layout: sent1 (+ sent2 when not blank), ending0, ending1, ...
            (a fifth or later ending that is blank or null is no option: the 4-option rows of a
            5-option table), label 0-based or a letter; or the original release: question, options
            {"A": ...} (in the order of their keys), answer_idx "A".
  medmcqa   question, opa, opb, opc, opd, cop (see below).
  pubmedqa  question (or QUESTION), context: a string, a list of strings (joined by newlines) or
            {"contexts": [...]} (also CONTEXTS), optional; final_decision yes/no/maybe.
A text field takes a string or a number (read as its digits); a list, an object, a boolean or null
is refused, never coerced. A record without an answer (label or cop missing or -1; no answer_idx or
final_decision) is a Question whose answer is None: `eval` counts it unlabelled, `data prepare`
refuses it (nothing to train on).

MedMCQA's numbering of cop, decided per file from the data: the original release (the GitHub/Kaggle
JSON lines of medmcqa/medmcqa) numbers cop 1-4; Hugging Face's openlifescienceai/medmcqa numbers it
0-3. A 0 anywhere in the file means 0-3, a 4 means 1-4, both is an error naming the two records.
A file whose cops are all 1-3 fits either; it is read as 0-3, the Hub's numbering (the source most
users download; a split of the original release with no "D" answer is rare at any size worth
training on), and `eval` says so in its notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

LETTERS = "ABCDEFGHIJ"  # the most options a prompt can letter
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")
UNLABELLED = -1  # MedQA's label and MedMCQA's cop on the test splits that carry no answer


class BadRecord(ValueError):
    """A record that does not fit its format; the message says why (without the file:line)."""


class NumberingError(BadRecord):
    """A MedMCQA file whose cops take both 0 and 4: neither numbering fits it. `where` is the
    position of the second of the two records, as the caller named it (a line, or file:line)."""

    def __init__(self, where: Any, message: str) -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True, kw_only=True, slots=True)
class Question:
    question: str
    options: tuple[str, ...]
    answer: int | None  # index into options; None when the record carries no answer
    context: str | None = None  # PubMedQA's abstract
    id: str | None = None  # the record's own id (data prepare's eval split hashes it)

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


# --- fields ---


def _object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return record


def _required(record: dict, *names: str) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise BadRecord(f"no {names[0]!r} field")


def _text(value: Any, name: str) -> str:
    """A text field: a string (a number is read as its digits); a list, an object or null is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRecord(f"{name} is {'null' if value is None else type(value).__name__}, expected text")
    return str(value)


def _integer(value: Any, name: str, expected: str) -> int:
    """A whole number (or its digits as a string): 1.5, true or "x" are refused, never rounded."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BadRecord(f"{name} {value!r} is not {expected}")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # (ValueError: also past int's digit limit)
        raise BadRecord(f"{name} {value!r} is not {expected}") from None


def _index(value: Any, n: int, name: str, base: int) -> int:
    """An option index from a number counted from base, or a letter."""
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS[:n]:
        return LETTERS.index(value.strip().upper())
    index = _integer(value, name, "an option number or letter") - base
    if not 0 <= index < n:
        raise BadRecord(f"{name} {value!r} is out of range ({base} to {n - 1 + base}, or A-{LETTERS[n - 1]})")
    return index


def _unlabelled(value: Any) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, str))
                             and str(value).strip() == str(UNLABELLED))


def record_id(record: dict, *names: str) -> str | None:
    """The first of these keys that holds a value, as text (a document's id for the eval split's hash)."""
    for name in names:
        value = record.get(name)
        if value is not None and value != "":
            return str(value)
    return None


def _options(options: list[str]) -> tuple[str, ...]:
    if len(options) < 2:
        raise BadRecord("fewer than two options")
    if len(options) > len(LETTERS):
        raise BadRecord(f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    return tuple(options)


# --- the sets ---


def medqa(record: Any) -> Question:
    record = _object(record)
    if "sent1" in record or "ending0" in record:  # Hugging Face
        question = _text(_required(record, "sent1"), "the question")
        sent2 = record.get("sent2")
        if sent2 is not None and _text(sent2, "sent2").strip():
            question = f"{question} {sent2}"
        options: list[str] = []
        while (key := f"ending{len(options)}") in record and len(options) <= len(LETTERS):
            value = record[key]
            if len(options) >= 4 and (value is None or (isinstance(value, str) and not value.strip())):
                break
            options.append(_text(value, key))
        label = record.get("label")
        answer = None if _unlabelled(label) else _index(label, len(options), "label", 0)
    else:  # the original release
        question = _text(_required(record, "question"), "the question")
        choices = _required(record, "options")
        if not isinstance(choices, dict):
            raise BadRecord("options must map letters to texts")
        keys = sorted(choices)
        options = [_text(choices[k], f"option {k}") for k in keys]
        idx = record.get("answer_idx")
        if idx is not None and idx not in keys:
            raise BadRecord(f"answer_idx {idx!r} is not one of the options {', '.join(map(str, keys))}")
        answer = None if idx is None else keys.index(idx)
    return Question(question=question, options=_options(options), answer=answer, id=record_id(record, "id"))


def medmcqa_cop(record: Any) -> int | None:
    """The record's cop as a number, None when it carries none (missing or -1)."""
    cop = _object(record).get("cop")
    if _unlabelled(cop):
        return None
    cop = _integer(cop, "cop", "an option number (0-3 or 1-4)")
    return None if cop == UNLABELLED else cop


def medmcqa_numbering(cops: Iterable[tuple[Any, int | None]]) -> tuple[int, str | None]:
    """The base of a file's cops (0 or 1, module docstring) from (where, cop) pairs (where: a line
    number or a file:line), and a note when the data fit either numbering."""
    first: dict[int, Any] = {}
    labelled = False
    for where, cop in cops:
        labelled = labelled or cop is not None
        if cop in (0, 4):
            first.setdefault(cop, where)
            other = 4 - cop
            if other in first:
                at = f"line {first[other]}" if isinstance(first[other], int) else first[other]
                raise NumberingError(where, f"cop takes both 0 and 4 (cop {other} at {at}, cop {cop} here); expected "
                                            f"0-3 (Hugging Face) or 1-4 (original release) throughout the file")
    if 4 in first:
        return 1, None
    if labelled and 0 not in first:
        return 0, "medmcqa: cop only took values 1-3; read as 0-3 (Hugging Face numbering)"
    return 0, None


def medmcqa(record: Any, base: int) -> Question:
    """One record, its cop counted from `base` (medmcqa_numbering of its file)."""
    cop = medmcqa_cop(record)
    options = tuple(_text(_required(record, key), key) for key in ("opa", "opb", "opc", "opd"))
    return Question(question=_text(_required(record, "question"), "question"), options=options,
                    answer=None if cop is None else _index(cop, 4, "cop", base), id=record_id(record, "id"))


def pubmedqa(record: Any) -> Question:
    record = _object(record)
    question = _text(_required(record, "question", "QUESTION"), "question")
    context = next((record[k] for k in ("context", "CONTEXTS", "contexts") if k in record), None)
    if isinstance(context, dict):
        context = context.get("contexts", context.get("CONTEXTS"))
    if isinstance(context, list):
        context = "\n".join(_text(c, "a context") for c in context)
    context = None if context is None else _text(context, "context")
    decision = record.get("final_decision")
    answer = None
    if decision is not None:
        decision = _text(decision, "final_decision").strip().lower()
        if decision not in PUBMEDQA_OPTIONS:
            raise BadRecord(f"final_decision {decision!r}; expected yes, no or maybe")
        answer = PUBMEDQA_OPTIONS.index(decision)
    return Question(question=question, options=PUBMEDQA_OPTIONS, answer=answer, context=context or None,
                    id=record_id(record, "pubid", "id"))
