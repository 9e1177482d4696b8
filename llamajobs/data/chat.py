"""Chat data: conversations rendered with a chat template, and the loss mask of their turns.

A conversation is a tuple of (role, content) turns, roles system, user and assistant. It is rendered
with the tokenizer's own chat template (tokenizer_config.json's chat_template, or a chat_template.jinja
beside it) through transformers' apply_chat_template, or with a named one (`--chat-template`:
chat_templates/NAME.jinja, data like the tokenizer's). Only the markup the template emits may become
special tokens: a special token's string inside a message ("<|im_end|>", "</s>") is text, or a user
could end the assistant's turn. So the messages are rendered with such strings hidden (each character
moved one for one into a private-use plane, so every offset holds), the special tokens left in the
rendering are the template's, and the text between them is tokenised with special-token strings kept
as text, each piece as the tokenizer tokenises the text between special tokens (so tokens merge exactly
as at inference). Each token is trained on when its first character lies in a trained span: by
default every assistant turn, from its first character to the end of its rendering (the turn's
end-of-turn token included, the header before it not), or every turn with `--train-on all`.

An assistant turn's span is found by rendering the conversation up to it with the generation prompt
(the header an inference server would send) and up to and including it: the first must be a prefix
of the second, and the second of the whole, which holds for the templates of LLaMA-3, Mistral,
Qwen, ChatML and Alpaca. A template for which it does not hold is refused, record by record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs.errors import SpecError

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
TEMPLATES = ("llama3", "chatml", "mistral", "alpaca")
TRAIN_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant")

Turn = tuple[str, str]  # (role, content)
HIDDEN = 0xF0000  # a hidden character's code point is this plus its own (planes 15 and 16: private use)


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
        special = {i: t for i, t in self.tokenizer.added_tokens_decoder.items()
                   if t.special and t.content and max(map(ord, t.content)) < 0x110000 - HIDDEN}
        self.special_ids = {t.content: i for i, t in special.items()}
        longest_first = sorted(special.values(), key=lambda t: len(t.content), reverse=True)
        names = [t.content for t in longest_first]
        self._markup = _alternation(map(_markup_pattern, longest_first))
        self._in_text = _alternation(map(re.escape, names))
        self._hidden = _alternation(re.escape(hide(name)) for name in names)
        self._first_piece, self._later_piece = text_tokenizers(self.tokenizer.backend_tokenizer)

    def render(self, turns: tuple[Turn, ...], generation_prompt: bool = False) -> str:
        """The conversation as the template renders it (the messages' text as given)."""
        return self.restore(self.render_hidden(turns, generation_prompt))

    def render_hidden(self, turns: tuple[Turn, ...], generation_prompt: bool = False) -> str:
        """The rendering with the special-token strings of the messages hidden: every special-token
        string left in it is the template's markup. As long as render()'s, character for character."""
        from jinja2 import TemplateError

        if self._in_text is not None:
            turns = tuple((role, self._in_text.sub(lambda m: hide(m.group()), content)) for role, content in turns)
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as e:  # raise_exception in a template raises TemplateError too
            raise RenderError(f"the chat template ({self.template_name}) refuses it: {e}") from None

    def restore(self, hidden: str) -> str:
        return hidden if self._hidden is None else self._hidden.sub(lambda m: unhide(m.group()), hidden)

    def spans(self, turns: tuple[Turn, ...]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation (special-token strings of the messages hidden) and the character
        spans trained on."""
        text = self.render_hidden(turns)
        if self.options.train_on == "all":
            return text, [(0, len(text))]
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self.render_hidden(turns[:i], generation_prompt=True) if i else ""
            through = self.render_hidden(turns[:i + 1])
            if not through.startswith(before) or not text.startswith(through):
                raise RenderError(f"the chat template ({self.template_name}) does not render turn {i + 1} as a "
                                  f"continuation of the turns before it, so its tokens cannot be told apart; "
                                  f"use --train-on all or another --chat-template")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, turns: tuple[Turn, ...]) -> tuple[list[int], list[int]]:
        """(ids, mask) of one conversation. BOS is added when the template did not put one first,
        EOS when it did not end with one (trained on when the last turn is)."""
        hidden, spans = self.spans(turns)
        ids, starts = self.tokenize(hidden)
        mask = [int(any(a <= start < b for a, b in spans)) for start in starts]
        if not ids or ids[0] != self.bos_id:
            ids, mask = [self.bos_id, *ids], [0, *mask]
        mask[0] = 0  # the BOS is never a target (nothing precedes it)
        if ids[-1] != self.eos_id:
            ids, mask = [*ids, self.eos_id], [*mask, mask[-1]]
        return ids, mask

    def tokenize(self, hidden: str) -> tuple[list[int], list[int]]:
        """(ids, each token's first character) of a rendering from render_hidden: its special-token
        strings become special tokens, the text between them is tokenised with none."""
        text = self.restore(hidden)
        ids: list[int] = []
        starts: list[int] = []

        def text_piece(a: int, b: int) -> None:
            if a < b:  # the first piece is tokenised as the start of a text, the others as what follows a special token
                encoded = (self._first_piece if a == 0 else self._later_piece).encode(text[a:b], add_special_tokens=False)
                ids.extend(encoded.ids)
                starts.extend(a + start for start, _ in encoded.offsets)

        position = 0
        for match in self._markup.finditer(hidden) if self._markup is not None else ():
            text_piece(position, match.start())
            name = match.group()
            ids.append(self.special_ids[name if name in self.special_ids else name.strip()])
            starts.append(match.start())
            position = match.end()
        text_piece(position, len(text))
        return ids, starts


def hide(text: str) -> str:
    return "".join(chr(HIDDEN + ord(c)) for c in text)


def unhide(text: str) -> str:
    return "".join(chr(ord(c) - HIDDEN) for c in text)


def _markup_pattern(token: Any) -> str:
    """An AddedToken's match in a rendering: with lstrip/rstrip, the white space beside it too, as the
    tokenizer takes it."""
    return ("\\s*" if token.lstrip else "") + re.escape(token.content) + ("\\s*" if token.rstrip else "")


def _alternation(patterns: Any) -> re.Pattern[str] | None:
    patterns = list(patterns)
    return re.compile("|".join(patterns)) if patterns else None


def text_tokenizers(backend: Any) -> tuple[Any, Any]:
    """Two copies of a `tokenizers` Tokenizer that keep special-token strings as text: one for a text's
    first piece and one for a piece after a special token. They differ for a Metaspace pre-tokenizer
    that prepends its "▁" only at the start of the text (prepend_scheme "first", LLaMA-2's and
    Mistral's): in one whole text, the piece after "</s>" gets none, and a piece tokenised on its own
    would."""
    from llamajobs.data.encoder import text_tokenizer

    def never_first(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                return {**node, "prepend_scheme": "never"}
            return {k: never_first(v) for k, v in node.items()}
        return [never_first(v) for v in node] if isinstance(node, list) else node

    config = json.loads(backend.to_str())
    later = {**config, "pre_tokenizer": never_first(config.get("pre_tokenizer"))}
    return text_tokenizer(backend.to_str()), text_tokenizer(json.dumps(later))


def describe(options: ChatOptions, encoder: ChatEncoder) -> dict[str, Any]:
    """What the store's meta.json says about its chat rendering."""
    return {"template": encoder.template_name, "train_on": options.train_on}
