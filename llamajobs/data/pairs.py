"""Preference pairs as store documents (`data prepare --format preference`).

Each answer of a pair is one document, BOS + prompt + answer + EOS, with the loss mask on the answer:
rendered with the chat template like `messages` when there is one, else as the prompt's text and the
answer's. A pair too long for --max-length loses its prompt's beginning first (truncate_pair).
"""

from __future__ import annotations

from pathlib import Path

from llamajobs.data import formats as fmts
from llamajobs.data.chat import ChatEncoder, ChatOptions
from llamajobs.data.encoder import TextCodec
from llamajobs.errors import SpecError

Document = tuple[list[int], list[int]]  # (ids, loss mask)


class PairEncoder:
    """A pair's two documents, chosen then rejected, cut to max_length together."""

    def __init__(self, codec: TextCodec, chat: ChatEncoder | None, max_length: int) -> None:
        self.codec = codec
        self.chat = chat
        self.max_length = max_length

    def encode(self, pair: fmts.Pair) -> tuple[list[Document], int]:
        """(the two documents, 1 if they were truncated else 0)."""
        return truncate_pair([self.answer(e) for e in pair.examples()], self.max_length)

    def answer(self, example: fmts.Example) -> Document:
        """A prompt and one answer: the chat rendering when there is a template, else BOS, the
        prompt's text and the answer's, EOS (the mask from where the prompt's tokens end; a token
        merged across the boundary counts as the answer's)."""
        if self.chat is not None:
            ids, mask = self.chat.encode(example.turns)  # (numpy arrays)
            return ids.tolist(), mask.tolist()
        ids = self.codec.encode([example.prompt + example.response])[0]
        prompt_ids = self.codec.encode([example.prompt])[0]
        prompt = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
        framed = [self.codec.bos_id, *ids, self.codec.eos_id]
        return framed, [0] * (1 + prompt) + [1] * (len(ids) - prompt + 1)


def pair_chat_encoder(tokenizer_path: str | Path, options: ChatOptions) -> ChatEncoder | None:
    """Preference pairs are rendered like `messages` when there is a chat template (--chat-template or
    the tokenizer's own), and as plain text when there is none."""
    try:
        return ChatEncoder(tokenizer_path, options)
    except SpecError:
        if options.template is not None:
            raise
        return None


def truncate_pair(docs: list[Document], max_length: int) -> tuple[list[Document], int]:
    """Cut a pair's two documents to max_length tokens; (the documents, 1 if cut else 0).

    What goes is the prompt's beginning (its end is what the answer follows: the last question and
    the assistant's header) and, when the longer answer alone does not fit in half the length, the
    answers' ends. Both documents keep the same number of prompt tokens, so the prompt stays shared.
    The BOS stays first. The prompt is what precedes the first target token of the mask."""
    if max_length <= 0 or all(len(ids) <= max_length for ids, _ in docs):
        return docs, 0
    starts = [mask.index(1) if 1 in mask else len(mask) for _, mask in docs]
    longest_answer = max(len(ids) - start for (ids, _), start in zip(docs, starts))
    prompt_keep = min(min(starts) - 1, max(max_length // 2, max_length - 1 - longest_answer))
    cut = []
    for (ids, mask), start in zip(docs, starts):
        keep = slice(start - prompt_keep, start + max_length - 1 - prompt_keep)
        cut.append(([ids[0], *ids[keep]], [mask[0], *mask[keep]]))
    return cut, 1
