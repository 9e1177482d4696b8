"""Chat data: conversations rendered with a chat template, and the loss mask of their turns.

A conversation is a tuple of (role, content) turns, roles system, user and assistant. It is rendered
with the tokenizer's own chat template (tokenizer_config.json's chat_template, or a chat_template.jinja
beside it) through transformers' apply_chat_template, or with a named one (`--chat-template`:
chat_templates/NAME.jinja, data like the tokenizer's). The rendered text is tokenised in one piece
(so tokens merge exactly as at inference) and each token is trained on when its first character lies
in a trained span: by default every assistant turn, from its first character to the end of its
rendering (the turn's end-of-turn token included, the header before it not), or every turn with
`--train-on all`.

An assistant turn's span is found by rendering the conversation up to it with the generation prompt
(the header an inference server would send) and up to and including it: the first must be a prefix
of the second, and the second of the whole, which holds for the templates of LLaMA-3, Mistral,
Qwen, ChatML and Alpaca. A template for which it does not hold is refused, record by record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs.errors import SpecError

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
TEMPLATES = ("llama3", "chatml", "mistral", "alpaca")
TRAIN_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant")

Turn = tuple[str, str]  # (role, content)


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """What `data prepare` was told about chat data (picklable: it goes to the tokenizing processes)."""
    template: str | None = None  # a name from TEMPLATES; None: the tokenizer's own
    train_on: str = "assistant"

    def __post_init__(self) -> None:
        if self.template is not None and self.template not in TEMPLATES:
            raise SpecError(f"--chat-template {self.template!r} is not known; choose one of {', '.join(TEMPLATES)}")
        if self.train_on not in TRAIN_ON:
            raise SpecError(f"--train-on {self.train_on!r}: choose assistant or all")


def named_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


class RenderError(ValueError):
    """A conversation the template refuses (its own raise_exception) or renders inconsistently."""


class ChatEncoder:
    """Render and tokenise conversations: ids and loss mask (1: a target), BOS first, EOS last."""

    def __init__(self, tokenizer_path: str | Path, options: ChatOptions) -> None:
        from llamajobs.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        self.options = options
        if options.template is not None:
            self.template, self.template_name = named_template(options.template), options.template
        elif getattr(self.tokenizer, "chat_template", None):
            self.template, self.template_name = self.tokenizer.chat_template, "tokenizer"
        else:
            raise SpecError(f"--tokenizer {tokenizer_path} has no chat template (no chat_template in its "
                            f"tokenizer_config.json); pass --chat-template {'|'.join(TEMPLATES)}")
        if not self.tokenizer.is_fast:
            raise SpecError(f"--tokenizer {tokenizer_path}: chat formats need a fast tokenizer (tokenizer.json) "
                            f"for the token offsets of the turns")
        self.bos_id, self.eos_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id

    def render(self, turns: tuple[Turn, ...], generation_prompt: bool = False) -> str:
        from jinja2 import TemplateError

        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as e:  # raise_exception in a template raises TemplateError too
            raise RenderError(f"the chat template ({self.template_name}) refuses it: {e}") from None

    def spans(self, turns: tuple[Turn, ...]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans trained on."""
        text = self.render(turns)
        if self.options.train_on == "all":
            return text, [(0, len(text))]
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self.render(turns[:i], generation_prompt=True) if i else ""
            through = self.render(turns[:i + 1])
            if not through.startswith(before) or not text.startswith(through):
                raise RenderError(f"the chat template ({self.template_name}) does not render turn {i + 1} as a "
                                  f"continuation of the turns before it, so its tokens cannot be told apart; "
                                  f"use --train-on all or another --chat-template")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, turns: tuple[Turn, ...]) -> tuple[list[int], list[int]]:
        """(ids, mask) of one conversation. BOS is added when the template did not put one first,
        EOS when it did not end with one (trained on when the last turn is)."""
        text, spans = self.spans(turns)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(encoded["input_ids"])
        mask = [int(any(a <= start < b for a, b in spans)) for start, _ in encoded["offset_mapping"]]
        if not ids or ids[0] != self.bos_id:
            ids, mask = [self.bos_id, *ids], [0, *mask]
        mask[0] = 0  # the BOS is never a target (nothing precedes it)
        if ids[-1] != self.eos_id:
            ids, mask = [*ids, self.eos_id], [*mask, mask[-1]]
        return ids, mask


def describe(options: ChatOptions, encoder: ChatEncoder) -> dict[str, Any]:
    """What the store's meta.json says about its chat rendering."""
    return {"template": encoder.template_name, "train_on": options.train_on}
