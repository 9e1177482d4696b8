"""One parser per multiple-choice set (llamajobs/data/mcq.py): the same file gives the same question,
options, context and answer through `data prepare` (its reader, its per-file scan, the format's
training example) and through `eval` (questions.read_questions), for every set and every layout
either command accepts; and the two refuse the same records, MedMCQA's ambiguous numbering included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamajobs import questions
from llamajobs.data import formats, mcq, readers
from llamajobs.data.prepare import scan_options
from llamajobs.errors import SpecError

MEDMCQA = {"question": "Drug of choice?", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}

# set -> layout -> records (all labelled: data prepare trains on every one)
LAYOUTS = {
    "medqa": {
        "hugging face, 4 options": [
            {"id": "q1", "sent1": "A man has chest pain.", "sent2": "What next?", "ending0": "MI", "ending1": "GERD",
             "ending2": "PE", "ending3": "Costochondritis", "label": 2},
            {"sent1": "Which?", "sent2": "", "ending0": "w", "ending1": "x", "ending2": "y", "ending3": "z",
             "label": "D"}],
        "hugging face, 5 options and a blank fifth": [
            {"sent1": "Five?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "ending4": "e",
             "label": 4},
            {"sent1": "Four?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "ending4": "",
             "label": "1"}],
        "original release": [
            {"question": "Which vitamin?", "options": {"A": "A", "B": "B12", "C": "C", "D": "D"},
             "answer_idx": "B", "answer": "B12"},
            {"question": "Five?", "options": {"E": "e", "A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "E"}],
    },
    "medmcqa": {
        "hugging face, cop 0-3": [{**MEDMCQA, "id": "m1", "cop": 0}, {**MEDMCQA, "cop": 3}, {**MEDMCQA, "cop": "2"}],
        "original release, cop 1-4": [{**MEDMCQA, "cop": 4}, {**MEDMCQA, "cop": 1}],
        "cop 1-3 only": [{**MEDMCQA, "cop": 1}, {**MEDMCQA, "cop": 3}],
    },
    "pubmedqa": {
        "context forms": [
            {"pubid": 1, "question": "Does X help?", "context": {"contexts": ["First.", "Second."]},
             "final_decision": "yes"},
            {"question": "Is Y safe?", "context": ["Only one."], "final_decision": "maybe"},
            {"question": "Z?", "context": "Plain string.", "final_decision": "No"},
            {"question": "No context?", "final_decision": "no"}],
        "original upper-case keys": [{"QUESTION": "Do mitochondria matter?", "CONTEXTS": ["Ctx."],
                                      "final_decision": "no"}],
    },
}
# What the first record of each layout must read as (so both paths agreeing on a wrong reading fails).
EXPECTED_FIRST = {
    ("medqa", "hugging face, 4 options"): ("A man has chest pain. What next?", 4, 2, None),
    ("medqa", "hugging face, 5 options and a blank fifth"): ("Five?", 5, 4, None),
    ("medqa", "original release"): ("Which vitamin?", 4, 1, None),
    ("medmcqa", "hugging face, cop 0-3"): ("Drug of choice?", 4, 0, None),
    ("medmcqa", "original release, cop 1-4"): ("Drug of choice?", 4, 3, None),
    ("medmcqa", "cop 1-3 only"): ("Drug of choice?", 4, 1, None),
    ("pubmedqa", "context forms"): ("Does X help?", 3, 0, "First.\nSecond."),
    ("pubmedqa", "original upper-case keys"): ("Do mitochondria matter?", 3, 1, "Ctx."),
}


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepared(task: str, path: Path) -> list[formats.Example]:
    """The training examples `data prepare --format TASK` makes of the file (before tokenizing)."""
    fmt = formats.get_format(task)
    options = scan_options(fmt, path)
    return [e for _, payload in readers.iter_records(path, fmt) for e in fmt.examples(readers.parse_record(payload),
                                                                                       options)]


@pytest.mark.parametrize("task, layout", list(EXPECTED_FIRST))
@pytest.mark.parametrize("container", ["jsonl", "json list"])
def test_prepare_and_eval_read_the_same_questions(tmp_path, task, layout, container):
    records = LAYOUTS[task][layout]
    path = tmp_path / "q.json"
    if container == "jsonl":
        write(path, records)
    else:
        path.write_text(json.dumps(records, indent=1))
    read = questions.read_questions(task, path)
    examples = prepared(task, path)
    assert len(read) == len(examples) == len(records)
    for q, example in zip(read, examples):
        assert example.prompt == questions.mcq_prompt(q)
        assert example.response == questions.mcq_answer(q)
        assert example.id == q.id
    first = read[0]
    assert (first.question, len(first.options), first.answer, first.context) == EXPECTED_FIRST[task, layout]


def test_pubmedqa_original_file_reads_the_same(tmp_path):
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps({"21645374": {"QUESTION": "Do mitochondria matter?", "CONTEXTS": ["A.", "B."],
                                             "final_decision": "yes"},
                                "100": {"QUESTION": "Second?", "CONTEXTS": ["C."], "final_decision": "maybe"}},
                               indent=1))
    read = questions.read_questions("pubmedqa", path)
    examples = prepared("pubmedqa", path)
    assert [questions.mcq_prompt(q) for q in read] == [e.prompt for e in examples]
    assert [(q.answer, q.context) for q in read] == [(0, "A.\nB."), (2, "C.")]
    assert [e.id for e in examples] == ["21645374", "100"]  # the key is the id data prepare's split hashes


@pytest.mark.parametrize("task, record, says", [
    ("medmcqa", {**MEDMCQA, "cop": 1.5}, "cop 1.5 is not"),
    ("medmcqa", {**MEDMCQA, "opa": ["a"], "cop": 1}, "opa is list"),
    ("medmcqa", {**MEDMCQA, "cop": 7}, "cop 7 is out of range"),
    ("medqa", {"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "G"}, "answer_idx 'G' is not one"),
    ("medqa", {"sent1": "q", "ending0": "a", "label": 0}, "fewer than two options"),
    ("medqa", {"sent1": "q", "ending0": "a", "ending1": "b", "label": True}, "label True is not"),
    ("pubmedqa", {"question": "q", "context": "c", "final_decision": "perhaps"}, "final_decision 'perhaps'"),
    ("pubmedqa", {"question": None, "context": "c", "final_decision": "yes"}, "question is null"),
])
def test_both_refuse_the_same_record_for_the_same_reason(tmp_path, task, record, says):
    path = write(tmp_path / "q.jsonl", [record])
    with pytest.raises(SpecError, match=f"{path}:1: {says}"):
        questions.read_questions(task, path)
    with pytest.raises(mcq.BadRecord, match=says):
        prepared(task, path)


def test_a_record_without_an_answer_is_unlabelled_in_eval_and_refused_by_prepare(tmp_path):
    for task, record in (("medqa", {"sent1": "q", "ending0": "a", "ending1": "b", "label": -1}),
                         ("medmcqa", {**MEDMCQA, "cop": -1}),
                         ("pubmedqa", {"question": "q", "context": "c"})):
        path = write(tmp_path / f"{task}.jsonl", [record])
        assert questions.read_questions(task, path)[0].answer is None
        with pytest.raises(mcq.BadRecord, match="no answer"):
            prepared(task, path)


def test_medmcqa_numbering_is_decided_by_the_data_the_same_way(tmp_path):
    both = write(tmp_path / "both.jsonl", [{**MEDMCQA, "cop": 0}, {**MEDMCQA, "cop": 2}, {**MEDMCQA, "cop": 4}])
    with pytest.raises(SpecError, match=rf"{both}:3: cop takes both 0 and 4 \(cop 0 at {both}:1, cop 4 here\)"):
        questions.read_questions("medmcqa", both)
    with pytest.raises(SpecError, match=rf"{both}:3: cop takes both 0 and 4 \(cop 0 at line 1, cop 4 here\)"):
        scan_options(formats.get_format("medmcqa"), both)
    notes: list[str] = []
    questions.read_questions("medmcqa", write(tmp_path / "amb.jsonl", [{**MEDMCQA, "cop": 2}]), notes)
    assert notes == ["medmcqa: cop only took values 1-3; read as 0-3 (Hugging Face numbering)"]
    unlabelled: list[str] = []
    questions.read_questions("medmcqa", write(tmp_path / "test.jsonl", [{**MEDMCQA, "cop": -1}]), unlabelled)
    assert unlabelled == []  # nothing labelled: nothing to decide, nothing to note
