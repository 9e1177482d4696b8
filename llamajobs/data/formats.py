"""Input formats of `data prepare`: turning a record into an Example.

An Example is a prompt (conditioning text, masked out of the loss) and a response (the text trained
on). Plain documents (text, s2orc, lmflow text_only) have an empty prompt. Instruction records are
rendered with a prompt template: Alpaca's (with or without input) or the multiple-choice template
shared by MedQA, MedMCQA and PubMedQA, whose response is the letter of the correct option.

How files are read into records: readers.py. The multiple-choice records are parsed by data/mcq.py,
the parser `eval` reads the same sets with (one set of rules for both).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from llamajobs.data import mcq
from llamajobs.data.mcq import LETTERS, BadRecord, record_id
from llamajobs.errors import SpecError

# --- prompt templates ---

# Alpaca's templates (stanford_alpaca train.py), with the newline after "### Response:" that
# alpaca-lora and medAlpaca use: the response then starts on a token boundary (LLaMA's newline is
# the byte piece <0x0A>, which merges with nothing), so the prompt's tokens are exactly a prefix.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

# One template for every multiple-choice set; the response is the letter alone (evaluate.py scores
# the letters' next-token probabilities after this same prompt).
MCQ_PROMPT = (
    "Below is a multiple-choice question{about}. Answer with the letter of the correct option.\n\n"
    "{context}### Question:\n{question}\n\n### Options:\n{options}\n\n### Answer:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def mcq_prompt(question: str, options: list[str], context: str = "") -> str:
    return MCQ_PROMPT.format(
        about=" about a context" if context else "",
        context=f"### Context:\n{context}\n\n" if context else "",
        question=question,
        options="\n".join(f"{letter}. {option}" for letter, option in zip(LETTERS, options)))


# --- records ---


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str        # masked out of the loss; "" for a plain document
    response: str      # trained on (an EOS follows it in the store)
    id: str | None = None  # the record's own id, when it has one (the eval split hashes it)
    turns: tuple[tuple[str, str], ...] = ()  # chat formats: (role, content), rendered by data/chat.py

    def split_key(self) -> str:
        """What decides train/eval: the id, or the content when there is none (so a duplicate
        lands in the same split as its twin)."""
        if self.id is not None:
            return "id:" + self.id
        return "sha1:" + hashlib.sha1(f"{self.prompt}\0{self.response}".encode()).hexdigest()


def field(record: Any, name: str, kind: type | tuple[type, ...] = str, *, optional: bool = False) -> Any:
    """record[name], checked: a missing field or a wrong type raises BadRecord naming the field."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {_json_type(record)}")
    if name not in record or (record[name] is None and not optional):
        raise BadRecord(f'missing field "{name}"')
    value = record[name]
    if value is None or isinstance(value, kind) and not isinstance(value, bool):
        return value
    want = " or ".join(_json_type(k()) for k in (kind if isinstance(kind, tuple) else (kind,)))
    raise BadRecord(f'field "{name}" is {_json_type(value)}, expected {want}')


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# --- formats ---


class Format:
    """One input format: `examples` turns a record into Examples (usually one; LMFlow's lines may
    hold several), raising BadRecord when the record does not fit.

    `expand` turns a whole-file JSON document into records (default: a list's elements);
    `scan`, when a format needs a first look at a file (MedMCQA's answer numbering), returns
    options that `examples` then receives for every record of that file.
    """

    name: ClassVar[str]
    instruct: ClassVar[bool] = False  # examples have prompts: the store keeps a loss mask
    expects: ClassVar[str]            # one record, shown when a record does not fit
    needs_scan: ClassVar[bool] = False
    chat: ClassVar[bool] = False      # examples are conversations (turns), rendered with a chat template
    pairs: ClassVar[bool] = False     # records are preference pairs (Preference.pair), for DPO

    def examples(self, record: Any, options: Any = None) -> list[Example]:
        raise NotImplementedError

    def expand(self, document: Any) -> Iterator[Any]:
        if not isinstance(document, list):
            raise BadRecord(f"expected JSON lines or a JSON list of records, got {_json_type(document)}")
        yield from document

    def scan(self, records: Iterator[tuple[int, Any]]) -> Any:
        return None


class Text(Format):
    name = "text"
    expects = '{"text": "..."} per line (an "id" is optional)'

    def examples(self, record, options=None):
        return [Example("", field(record, "text"), record_id(record, "id"))]


class S2orc(Format):
    name = "s2orc"
    expects = '{"corpusid": ..., "externalids": {"pubmedcentral": "..."}, "content": {"text": "..."}} per line'

    def examples(self, record, options=None):
        content = field(record, "content", dict)
        if "text" not in content or content["text"] is None:
            raise BadRecord('missing field "content.text"')
        if not isinstance(content["text"], str):
            raise BadRecord(f'field "content.text" is {_json_type(content["text"])}, expected a string')
        ids = record.get("externalids") or {}
        doc_id = record_id(ids, "pubmedcentral") if isinstance(ids, dict) else None
        return [Example("", content["text"], doc_id or record_id(record, "corpusid", "id"))]


class Alpaca(Format):
    name = "alpaca"
    instruct = True
    expects = '{"instruction": "...", "input": "...", "output": "..."} ("input" may be empty or absent)'

    def examples(self, record, options=None):
        instruction = field(record, "instruction")
        input = field(record, "input", optional=True) if "input" in record else None
        output = field(record, "output")
        return [Example(alpaca_prompt(instruction, input or ""), output, record_id(record, "id"))]


def _mcq(q: mcq.Question, answer_field: str) -> list[Example]:
    """A parsed question (data/mcq.py, the parser `eval` reads with too) as a training example: the
    prompt, and the gold letter as the response."""
    if q.answer is None:
        raise BadRecord(f"no answer ({answer_field}); a training example needs one")
    return [Example(mcq_prompt(q.question, list(q.options), q.context or ""), LETTERS[q.answer], q.id)]


class MedQA(Format):
    name = "medqa"
    instruct = True
    expects = ('{"sent1": "...", "ending0": "...", "ending1": "...", "ending2": "...", "ending3": "...", '
               '"label": 0-3} per line (the Hugging Face MedQA-USMLE layout; a fifth ending is read too), or '
               '{"question": "...", "options": {"A": "...", ...}, "answer_idx": "A"} (the original release)')

    def examples(self, record, options=None):
        return _mcq(mcq.medqa(record), "label or answer_idx missing, or label -1")


class MedMCQA(Format):
    """`scan` decides the file's cop numbering (mcq.medmcqa_numbering: 0-3 or 1-4) before its records
    are read; a file with both 0 and 4 stops there, at the line that makes it ambiguous."""

    name = "medmcqa"
    instruct = True
    expects = ('{"question": "...", "opa": "...", "opb": "...", "opc": "...", "opd": "...", "cop": 0-3} per line '
               '(cop 1-4 as in the original release is recognised per file)')
    needs_scan = True

    def scan(self, records):
        def cops():
            for number, record in records:
                if isinstance(record, (bytes, str)):
                    try:
                        record = json.loads(record)
                    except (ValueError, RecursionError):
                        continue  # reported by the real pass
                try:
                    yield number, mcq.medmcqa_cop(record)
                except BadRecord:
                    continue  # likewise
        return mcq.medmcqa_numbering(cops())[0]

    def examples(self, record, options=None):
        return _mcq(mcq.medmcqa(record, options or 0), "cop missing or -1")


class PubMedQA(Format):
    name = "pubmedqa"
    instruct = True
    expects = ('{"question": "...", "context": {"contexts": ["..."]} or "...", "final_decision": "yes"|"no"|"maybe"} '
               'per line, or the original {"PMID": {"QUESTION", "CONTEXTS", "final_decision"}} file')

    def expand(self, document):
        if isinstance(document, dict):  # ori_pqal.json: {pmid: record}
            for pmid, record in document.items():
                yield {**record, "pubid": pmid} if isinstance(record, dict) else record
        else:
            yield from super().expand(document)

    def examples(self, record, options=None):
        if (isinstance(record, dict) and record and "question" not in record and "QUESTION" not in record
                and all(isinstance(v, dict) for v in record.values())):  # a one-line {pmid: record} file
            return [e for r in self.expand(record) for e in self.examples(r)]
        return _mcq(mcq.pubmedqa(record), "final_decision missing")


class LMFlow(Format):
    name = "lmflow"
    instruct = True  # text2text has prompts; text_only rows get a mask of ones
    expects = ('{"type": "text_only", "instances": [{"text": "..."}]} or '
               '{"type": "text2text", "instances": [{"input": "...", "output": "..."}]}')

    def expand(self, document):
        kind = field(document, "type")
        for instance in field(document, "instances", list):
            yield {"type": kind, "instances": [instance]}  # one small record per instance

    def examples(self, record, options=None):
        kind = field(record, "type")
        instances = field(record, "instances", list)
        if kind == "text_only":
            return [Example("", field(i, "text"), record_id(i, "id")) for i in instances]
        if kind == "text2text":
            return [Example(field(i, "input"), field(i, "output"), record_id(i, "id")) for i in instances]
        raise BadRecord(f'field "type" is {kind!r}, expected text_only or text2text')


def _conversation(turns: list[tuple[str, str]], doc_id: str | None) -> Example:
    # The response stands for the whole conversation: what an empty check and the eval split's hash see.
    return Example("", "\n".join(content for _, content in turns), doc_id, tuple(turns))


def _turns(record: Any, name: str, role_key: str, content_key: str, roles: dict[str, str],
           need_assistant: bool = True) -> list[tuple[str, str]]:
    turns = []
    given = field(record, name, list)
    if not given:
        raise BadRecord(f'field "{name}" is an empty list')
    for i, turn in enumerate(given):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(f'field "{where}" is {_json_type(turn)}, expected an object')
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or role not in roles:
            raise BadRecord(f'field "{where}.{role_key}" is {role!r}, expected one of {", ".join(roles)}')
        if not isinstance(content, str):
            raise BadRecord(f'field "{where}.{content_key}" is {_json_type(content)}, expected a string')
        turns.append((roles[role], content))
    if need_assistant and "assistant" not in (role for role, _ in turns):
        raise BadRecord(f'field "{name}" has no {"assistant" if role_key == "role" else "gpt"} turn')
    return turns


class Messages(Format):
    name = "messages"
    instruct = True
    chat = True
    expects = ('{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} per line '
               '(the OpenAI / Hugging Face chat layout)')

    def examples(self, record, options=None):
        roles = {r: r for r in ("system", "user", "assistant")}
        return [_conversation(_turns(record, "messages", "role", "content", roles), record_id(record, "id"))]


class ShareGPT(Format):
    name = "sharegpt"
    instruct = True
    chat = True
    expects = '{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]} per line'
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

    def examples(self, record, options=None):
        turns = _turns(record, "conversations", "from", "value", self.roles)
        return [_conversation(turns, record_id(record, "id"))]


@dataclass(frozen=True, slots=True)
class Pair:
    """A preference record: the prompt's turns and the two answers (the assistant's, chosen first)."""
    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    id: str | None = None

    def examples(self) -> list[Example]:
        """Two Examples, chosen then rejected; each a conversation (the prompt's turns and one answer)
        with the plain-text prompt and response beside it for a tokenizer without a chat template."""
        text = "\n".join(content for _, content in self.prompt) + "\n"  # the answer starts on a new line
        return [Example(text, answer, self.id, (*self.prompt, ("assistant", answer)))
                for answer in (self.chosen, self.rejected)]

    def split_key(self) -> str:
        """Both answers of a pair land in the same split: the key is the pair's, not an answer's."""
        if self.id is not None:
            return "id:" + self.id
        return "sha1:" + hashlib.sha1(json.dumps([self.prompt, self.chosen, self.rejected]).encode()).hexdigest()


class Preference(Format):
    """Preference pairs for DPO: a prompt, the chosen answer and the rejected one. Answers are strings,
    or message lists whose last message is the assistant's answer (UltraFeedback-binarized: the
    messages before it repeat the prompt; they are the prompt's turns then, and must agree)."""

    name = "preference"
    instruct = True
    chat = True   # rendered with the chat template when there is one (prepare.py: else as plain text)
    pairs = True  # each record is two documents, chosen then rejected, kept together
    expects = ('{"prompt": "..." or [messages], "chosen": "..." or [messages], "rejected": "..." or [messages]} per '
               'line (a message list ends with the assistant\'s answer)')

    def examples(self, record, options=None):
        raise NotImplementedError("preference records are pairs: call pair()")

    def pair(self, record: Any) -> Pair:
        roles = {r: r for r in ("system", "user", "assistant")}
        answers = []
        contexts = []
        for name in ("chosen", "rejected"):
            value = field(record, name, (str, list))
            if isinstance(value, str):
                answers.append(value)
                contexts.append(())
                continue
            turns = _turns(record, name, "role", "content", roles, need_assistant=False)
            if turns[-1][0] != "assistant":
                raise BadRecord(f'field "{name}" does not end with an assistant message (its answer)')
            answers.append(turns[-1][1])
            contexts.append(tuple(turns[:-1]))
        if contexts[0] != contexts[1]:
            raise BadRecord('fields "chosen" and "rejected" answer different conversations (the messages before '
                            'their last differ)')
        prompt: tuple[tuple[str, str], ...] = contexts[0]
        if not prompt:  # the answers carry no context: the prompt field is it
            given = field(record, "prompt", (str, list))
            prompt = ((("user", given),) if isinstance(given, str)
                      else tuple(_turns(record, "prompt", "role", "content", roles, need_assistant=False)) if given else ())
        if not prompt or not any(content.strip() for _, content in prompt):
            raise BadRecord('field "prompt" is empty')
        for name, answer in zip(("chosen", "rejected"), answers):
            if not answer.strip():
                raise BadRecord(f'field "{name}" is an empty answer')
        if answers[0] == answers[1]:
            raise BadRecord('fields "chosen" and "rejected" are the same answer (nothing to prefer)')
        return Pair(prompt, answers[0], answers[1], record_id(record, "id", "prompt_id"))


FORMATS: dict[str, type[Format]] = {f.name: f for f in (Text, S2orc, Alpaca, Messages, ShareGPT, MedQA, MedMCQA,
                                                        PubMedQA, LMFlow, Preference)}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise SpecError(f"--format {name!r} is not known; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]()
