"""Chat data: conversations rendered with a chat template, and the loss mask of their turns.

A conversation is a tuple of (role, content) turns, roles system, user and assistant. It is rendered
with the tokenizer's own chat template (tokenizer_config.json's chat_template, or a chat_template.jinja
beside it) through transformers' apply_chat_template, or with a named one (`--chat-template`:
chat_templates/NAME.jinja, data like the tokenizer's). Only the markup the template emits may become
special tokens: a special token's string inside a message ("<|im_end|>", "</s>") is text, or a user
could end the assistant's turn. So the messages are rendered with such strings hidden (each character
moved one for one onto a surrogate code point, so every offset holds; a message's own lone surrogates
are cleaned to U+FFFD first, as the text formats do, so hiding never meets a character of the data and
every other character, private-use ones included, comes back as it was), the special tokens left in
the rendering are the template's, and the text between them is tokenised with special-token strings
kept as text, each piece as the tokenizer tokenises the text between special tokens (so tokens merge
exactly as at inference). Each token is trained on when its first character lies in a trained span:
by default every assistant turn, from its first character to the end of its rendering (the turn's
end-of-turn token included, the header before it not), or every turn with `--train-on all`.

An assistant turn's span is found by rendering the conversation up to it with the generation prompt
(the header an inference server would send) and up to and including it: the first must be a prefix
of the second, and the second of the whole, which holds for the templates of LLaMA-3, Mistral,
Qwen, ChatML and Alpaca. A template for which it does not hold is refused, record by record; one that
fails to render (a syntax error, a sandbox violation, no end within RENDER_SECONDS) is refused whole.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from llamajobs.errors import SpecError

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
TEMPLATES = ("llama3", "chatml", "mistral", "alpaca")
TRAIN_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant")

Turn = tuple[str, str]  # (role, content)
HIDDEN = 0xD800  # hidden characters are the surrogates U+D800..U+DFFF: no cleaned message holds one
HIDDEN_CHARS = 0x800
SURROGATE = re.compile("[\ud800-\udfff]")
# One rendering of one conversation takes milliseconds, even of megabytes; a template that loops for
# longer than this is refused rather than left to hang the prepare.
RENDER_SECONDS = 10.0
# A text piece longer than this many characters is tokenised a window at a time: the Rust encoding of
# one text holds about 250 bytes per token, 2.5 GB for a 10 MB message in one piece.
WINDOW = 1 << 16


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


class RenderTimeout(BaseException):
    """A rendering ran past RENDER_SECONDS (a BaseException: no `except Exception` in the template's
    Python callees swallows it)."""


@dataclass(frozen=True, slots=True)
class ChatTokenizer:
    """What rendering and tokenising chat needs of a tokenizer, read once with transformers. Picklable:
    a worker process builds its ChatEncoder from it without transformers' tokenizer classes, which
    import torch (seconds of start-up per worker, longer than a small prepare's tokenising)."""
    path: str
    tokenizer_json: str
    template: str
    template_name: str                 # a name from TEMPLATES, or "tokenizer"
    template_label: str                # how messages name it
    template_kwargs: dict[str, Any]    # what apply_chat_template passes to the template: bos_token, eos_token, ...
    bos_id: int | None
    eos_id: int
    special: tuple[tuple[int, str, bool, bool], ...]  # (id, content, lstrip, rstrip) of each special added token


def read_chat_tokenizer(tokenizer: Any, tokenizer_path: str | Path, options: ChatOptions) -> ChatTokenizer:
    if options.template is not None:
        template, name, label = named_template(options.template), options.template, f"--chat-template {options.template}"
    elif getattr(tokenizer, "chat_template", None):
        template, name, label = tokenizer.chat_template, "tokenizer", f"the chat template of --tokenizer {tokenizer_path}"
    else:
        where = ("a sentencepiece model file carries none" if Path(tokenizer_path).is_file()
                 else "no chat_template in its tokenizer_config.json")
        raise SpecError(f"--tokenizer {tokenizer_path} has no chat template ({where}); pass --chat-template "
                        f"{'|'.join(TEMPLATES)}")
    if not tokenizer.is_fast:
        raise SpecError(f"--tokenizer {tokenizer_path}: chat formats need a fast tokenizer (tokenizer.json) "
                        f"for the token offsets of the turns")
    if tokenizer.eos_token_id is None:
        raise SpecError(f"--tokenizer {tokenizer_path} has no EOS token; a causal LM's tokenizer has one")
    special = tuple((i, t.content, t.lstrip, t.rstrip) for i, t in sorted(tokenizer.added_tokens_decoder.items())
                    if t.special and t.content)
    return ChatTokenizer(str(tokenizer_path), tokenizer.backend_tokenizer.to_str(), template, name, label,
                         dict(tokenizer.special_tokens_map), tokenizer.bos_token_id, tokenizer.eos_token_id, special)


class ChatEncoder:
    """Render and tokenise conversations: ids and loss mask (1: a target); BOS first when the tokenizer
    has one, EOS last. Built from a tokenizer path (transformers loads it: `tokenizer` is then the
    transformers tokenizer, for decoding), or from a ChatTokenizer (`tokenizer` None); pickled as its
    ChatTokenizer."""

    def __init__(self, source: str | Path | ChatTokenizer, options: ChatOptions, window: int = WINDOW) -> None:
        self.tokenizer = None
        if not isinstance(source, ChatTokenizer):
            from llamajobs.data.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(source)
            source = read_chat_tokenizer(self.tokenizer, source, options)
        self._build(source, options, window)

    def __getstate__(self) -> tuple[ChatTokenizer, ChatOptions, int]:
        return self.spec, self.options, self.window

    def __setstate__(self, state: tuple[ChatTokenizer, ChatOptions, int]) -> None:
        self.tokenizer = None
        self._build(*state)

    def _build(self, spec: ChatTokenizer, options: ChatOptions, window: int) -> None:
        self.spec, self.options, self.window = spec, options, window
        self.template, self.template_name, self.template_label = spec.template, spec.template_name, spec.template_label
        # No BOS (Qwen's tokenizers): a document starts with the template's first token, as at inference.
        self.bos_id, self.eos_id = spec.bos_id, spec.eos_id
        special, hidden = {}, {}
        for i, content, lstrip, rstrip in spec.special:
            new = sorted(set(content) - hidden.keys())
            if len(hidden) + len(new) > HIDDEN_CHARS:
                continue  # not markup: the template's string of it is tokenised as text
            hidden.update({c: chr(HIDDEN + len(hidden) + n) for n, c in enumerate(new)})
            special[i] = (content, lstrip, rstrip)
        self._hide, self._unhide = str.maketrans(hidden), str.maketrans({v: k for k, v in hidden.items()})
        self.special_ids = {content: i for i, (content, _, _) in special.items()}
        longest_first = sorted(special.values(), key=lambda t: len(t[0]), reverse=True)
        names = [content for content, _, _ in longest_first]
        self._markup = _alternation(_markup_pattern(*t) for t in longest_first)
        self._in_text = _alternation(map(re.escape, names))
        self._hidden = _alternation(re.escape(self.hide(name)) for name in names)
        self._first_piece, self._later_piece, self._continued = text_tokenizers(spec.tokenizer_json)
        self._cut = window_cuts(spec.tokenizer_json, self._later_piece)

    def hide(self, text: str) -> str:
        return text.translate(self._hide)

    def restore(self, hidden: str) -> str:
        return hidden if self._hidden is None else self._hidden.sub(lambda m: m.group().translate(self._unhide), hidden)

    def render(self, turns: tuple[Turn, ...], generation_prompt: bool = False) -> str:
        """The conversation as the template renders it (the messages' text as given, lone surrogates
        cleaned)."""
        return self.restore(self.render_hidden(turns, generation_prompt))

    def render_hidden(self, turns: tuple[Turn, ...], generation_prompt: bool = False) -> str:
        """The rendering with the special-token strings of the messages hidden: every special-token
        string left in it is the template's markup. As long as render()'s, character for character."""
        return self._render(self._hidden_turns(turns), generation_prompt)

    def _hidden_turns(self, turns: tuple[Turn, ...]) -> tuple[Turn, ...]:
        def hidden(content: str) -> str:
            if SURROGATE.search(content):  # a lone surrogate ("\ud800" in the JSON) is no text: U+FFFD, as text formats do
                content = content.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return content if self._in_text is None else self._in_text.sub(lambda m: self.hide(m.group()), content)

        return tuple((role, hidden(content)) for role, content in turns)

    def _render(self, turns: tuple[Turn, ...], generation_prompt: bool) -> str:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template  # no torch, unlike the tokenizers

        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            with time_limit(RENDER_SECONDS):  # as apply_chat_template(tokenize=False) renders
                rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.template,
                                                    add_generation_prompt=generation_prompt, **self.spec.template_kwargs)
                return rendered[0]
        except RenderTimeout:
            raise SpecError(f"{self.template_label} rendered one conversation ({len(turns)} turns, "
                            f"{sum(len(c) for _, c in turns):,} characters) for over {RENDER_SECONDS:g} s without "
                            f"an end (a loop too large?); fix the template or pass --chat-template "
                            f"{'|'.join(TEMPLATES)}") from None
        except TemplateError as e:
            if type(e) is TemplateError:  # the template's raise_exception: it refuses this conversation
                raise RenderError(f"the chat template ({self.template_name}) refuses it: {e}") from None
            raise self._broken(e) from None  # a syntax error, a sandbox violation, an undefined name
        except Exception as e:  # the messages are role and content strings: what fails here is the template
            raise self._broken(e) from None

    def _broken(self, e: BaseException) -> SpecError:
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return SpecError(f"{self.template_label} cannot be rendered ({type(e).__name__}"
                         f"{': ' + detail if detail else ''}); fix the template or pass --chat-template "
                         f"{'|'.join(TEMPLATES)}")

    def spans(self, turns: tuple[Turn, ...]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation (special-token strings of the messages hidden) and the character
        spans trained on."""
        turns = self._hidden_turns(turns)
        text = self._render(turns, False)
        if self.options.train_on == "all":
            return text, [(0, len(text))]
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self._render(turns[:i], True) if i else ""
            through = self._render(turns[:i + 1], False)
            if not through.startswith(before) or not text.startswith(through):
                raise RenderError(f"the chat template ({self.template_name}) does not render turn {i + 1} as a "
                                  f"continuation of the turns before it, so its tokens cannot be told apart; "
                                  f"use --train-on all or another --chat-template")
            spans.append((len(before), len(through)))
        return text, spans

    def encode(self, turns: tuple[Turn, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, mask uint8) of one conversation. The BOS is added when the tokenizer has one and
        the template did not put it first, the EOS when the rendering does not end with it (trained on
        when the last token is). The mask is made part by part: no array of every token's start."""
        hidden, spans = self.spans(turns)
        bounds = span_bounds(spans)
        ids: list[np.ndarray] = []
        mask: list[np.ndarray] = []
        for part_ids, part_mask in self._token_parts(hidden, lambda starts: in_spans(starts, bounds)):
            ids.append(part_ids)
            mask.append(part_mask)
        if self.bos_id is not None and (not ids or ids[0][0] != self.bos_id):
            ids.insert(0, np.array([self.bos_id], np.uint32))
            mask.insert(0, np.zeros(1, np.uint8))
        if not ids or ids[-1][-1] != self.eos_id:
            ids.append(np.array([self.eos_id], np.uint32))
            mask.append(mask[-1][-1:].copy() if mask else np.zeros(1, np.uint8))
        ids_array, mask_array = np.concatenate(ids), np.concatenate(mask)
        mask_array[0] = 0  # the first token is never a target (nothing precedes it)
        return ids_array, mask_array

    def tokenize(self, hidden: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids uint32, each token's first character int64) of a rendering from render_hidden: its
        special-token strings become special tokens, the text between them is tokenised with none."""
        parts = list(self._token_parts(hidden, lambda starts: starts))
        if not parts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        return np.concatenate([ids for ids, _ in parts]), np.concatenate([starts for _, starts in parts])

    def _token_parts(self, hidden: str, keep: Callable[[np.ndarray], np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """tokenize()'s (ids, keep(starts)) in parts: each special token, each text piece (or window of
        one). encode() keeps each part's mask, not its starts (8 bytes a token)."""
        text = self.restore(hidden)
        position = 0
        for match in self._markup.finditer(hidden) if self._markup is not None else ():
            if position < match.start():  # the first piece is tokenised as the start of a text, the others as what follows a special token
                yield from self._encode_piece(text, position, match.start(), keep)
            name = match.group()
            yield (np.array([self.special_ids[name if name in self.special_ids else name.strip()]], np.uint32),
                   keep(np.array([match.start()], np.int64)))
            position = match.end()
        if position < len(text):
            yield from self._encode_piece(text, position, len(text), keep)

    def _encode_piece(self, text: str, a: int, b: int,
                      keep: Callable[[np.ndarray], np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The tokens of text[a:b], a piece between special tokens, as (ids, keep(starts)) parts. A long piece
        is tokenised a window at a time, cut at the start of a word well inside the window: the next
        window starts there, and its first tokens must be those the window before gave past the cut,
        or the piece is tokenised whole after all."""
        tokenizer = first = self._first_piece if a == 0 else self._later_piece
        if b - a <= self.window or self._cut is None:
            yield _arrays(tokenizer.encode(text[a:b], add_special_tokens=False), a, keep)
            return
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        position, window, expected = a, self.window, None
        while True:
            end = min(b, position + window)
            encoding = tokenizer.encode(text[position:end], add_special_tokens=False)
            if expected is not None and encoding.ids[:len(expected)] != expected:
                yield _arrays(first.encode(text[a:b], add_special_tokens=False), a, keep)  # not local after all
                return
            if end == b:
                parts.append(_arrays(encoding, position, keep))
                break
            cut = self._cut(encoding, end - position - window // 16)
            if cut is None:  # one word over most of the window: a larger one
                window *= 2
                continue
            token, char = cut
            offsets = encoding.offsets
            parts.append(_arrays(encoding, position, keep, token))
            # What the next window must begin with: this one's tokens past the cut, up to well before its end.
            limit = end - position - window // 32
            expected = [t for t, (_, stop) in zip(encoding.ids[token:], offsets[token:]) if stop <= limit]
            position += char
            tokenizer, window = self._continued, self.window
        yield from parts


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RenderTimeout in the block after `seconds`. SIGALRM: only in a process's main thread (which
    encodes, with --workers 1 and in each worker process); elsewhere, or with a timer of someone else's
    already set, no limit."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0]:
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise RenderTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def span_bounds(spans: list[tuple[int, int]]) -> np.ndarray:
    """The spans [a, b) merged where they overlap, as sorted bounds a0, b0, a1, b1, ..."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        elif a < b:
            merged.append([a, b])
    return np.array(merged, np.int64).ravel()


def in_spans(starts: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """1 where a start lies in one of the spans of span_bounds, else 0 (uint8): after an odd number of
    bounds."""
    after = np.searchsorted(bounds, starts, side="right")
    after &= 1
    return after.astype(np.uint8)


def _arrays(encoding: Any, offset: int, keep: Callable[[np.ndarray], np.ndarray],
            stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, keep(starts)) of an Encoding's tokens before `stop`, starts shifted by offset."""
    ids, offsets = encoding.ids[:stop], encoding.offsets[:stop]
    return (np.array(ids, np.uint32),
            keep(np.fromiter((start for start, _ in offsets), np.int64, len(offsets)) + offset))


def window_cuts(tokenizer_json: str, tokenizer: Any) -> Callable[[Any, int], tuple[int, int] | None] | None:
    """Where a long piece may be cut between windows: where tokens never cross. At word starts when the
    pre-tokenizer splits words (byte-level BPE: Llama 3, Qwen, Mistral's tokenizer.json). Sentencepiece's
    BPE as transformers converts it (Metaspace without split: the piece is one word) at a "▁" after
    another character, when no token of the vocabulary holds "▁" after another character (LLaMA's and
    Mistral's do not): no merge can cross it, so each side merges as it would alone. Otherwise None: the
    piece is tokenised whole."""
    if len(set(tokenizer.encode("a b", add_special_tokens=False).word_ids)) > 1:
        return _last_word_start
    config = json.loads(tokenizer_json)
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend([node] if node.get("type") == "Metaspace" else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config.get("pre_tokenizer"))
    model = config.get("model") or {}
    if len(found) != 1 or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None
    space = found[0].get("replacement", "\u2581")
    if any(space in token.lstrip(space) for token in model["vocab"]):
        return None
    return lambda encoding, limit: _last_space_start(space, encoding, limit)


def _last_space_start(space: str, encoding: Any, limit: int) -> tuple[int, int] | None:
    """(token index, character) of the last token at or before character `limit` that starts with the
    space mark after a token that does not end with one."""
    tokens, offsets = encoding.tokens, encoding.offsets
    for token in range(len(tokens) - 1, 0, -1):
        if offsets[token][0] <= limit and tokens[token].startswith(space) and not tokens[token - 1].endswith(space):
            return token, offsets[token][0]
    return None


def _last_word_start(encoding: Any, limit: int) -> tuple[int, int] | None:
    """(token index, character) of the last word start at or before character `limit`, after the
    first word; None when there is none. Found by the tokens' offsets, its character then read from
    the word's own span (once: word_to_chars walks the encoding)."""
    words, offsets = encoding.word_ids, encoding.offsets
    for token in range(len(words) - 1, 0, -1):
        if offsets[token][0] <= limit and words[token] is not None and words[token] != words[token - 1]:
            return token, encoding.word_to_chars(words[token])[0]
    return None


def _markup_pattern(content: str, lstrip: bool, rstrip: bool) -> str:
    """An added token's match in a rendering: with lstrip/rstrip, the white space beside it too, as the
    tokenizer takes it."""
    return ("\\s*" if lstrip else "") + re.escape(content) + ("\\s*" if rstrip else "")


def _alternation(patterns: Any) -> re.Pattern[str] | None:
    patterns = list(patterns)
    return re.compile("|".join(patterns)) if patterns else None


def text_tokenizers(tokenizer_json: str) -> tuple[Any, Any, Any]:
    """Three copies of a `tokenizers` Tokenizer that keep special-token strings as text: one for a
    text's first piece, one for a piece after a special token, and one for the rest of a long piece
    tokenised a window at a time (continued). The first two differ for a Metaspace pre-tokenizer that
    prepends its "▁" only at the start of the text (prepend_scheme "first", LLaMA-2's and Mistral's):
    in one whole text, the piece after "</s>" gets none, and a piece tokenised on its own would. The
    continued one prepends nothing at all (no "▁", no ByteLevel prefix space, no Prepend normalizer):
    it starts inside a piece."""
    from llamajobs.data.encoder import text_tokenizer

    def rewritten(node: Any, change: Any) -> Any:
        if isinstance(node, dict):
            node = change(node)
            return None if node is None else {k: rewritten(v, change) for k, v in node.items()}
        if isinstance(node, list):
            return [n for n in (rewritten(v, change) for v in node) if n is not None]
        return node

    def never_first(node: dict) -> dict:
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            return {**node, "prepend_scheme": "never"}
        return node

    def no_prefix(node: dict) -> dict | None:
        if node.get("type") == "Metaspace":
            return {**node, "prepend_scheme": "never"}
        if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            return {**node, "add_prefix_space": False}
        if node.get("type") == "Replace" and str((node.get("pattern") or {}).get("Regex", "")).startswith("\\A"):
            return None  # transformers' sentencepiece conversion: "\A▁" -> "▁▁", at a text's start only
        return None if node.get("type") == "Prepend" else node

    config = json.loads(tokenizer_json)
    later = {**config, "pre_tokenizer": rewritten(config.get("pre_tokenizer"), never_first)}
    continued = {**config, "pre_tokenizer": rewritten(config.get("pre_tokenizer"), no_prefix),
                 "normalizer": rewritten(config.get("normalizer"), no_prefix)}
    return text_tokenizer(tokenizer_json), text_tokenizer(json.dumps(later)), text_tokenizer(json.dumps(continued))


def describe(options: ChatOptions, encoder: ChatEncoder) -> dict[str, Any]:
    """What the store's meta.json says about its chat rendering."""
    return {"template": encoder.template_name, "train_on": options.train_on}
