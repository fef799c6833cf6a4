"""Incremental detokenization and server-side stop sequences."""
from __future__ import annotations

from typing import Callable

CONTEXT = 6  # prompt tokens decoded before the first new one, so a leading space or a merged byte decodes right


def plain_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)` as a function, calling the Rust tokenizer directly where
    transformers' decode would only wrap it (a TokenizersBackend that neither overrides decode nor cleans up spaces):
    the same text at ~1.1 us a call instead of ~3.7 us, paid twice per generated token by the Detokenizer."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: its decode as it is
        TokenizersBackend = PreTrainedTokenizerBase = None
    kind = type(tokenizer)
    if (TokenizersBackend is not None and isinstance(tokenizer, TokenizersBackend)
            and kind._decode is TokenizersBackend._decode and kind.decode is PreTrainedTokenizerBase.decode
            and not tokenizer.clean_up_tokenization_spaces):
        backend = tokenizer._tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Turns tokens into text deltas as they come, holding back bytes that do not yet form a character.

    Decodes only a short window (the tokens since the last emitted text plus a little context), as vLLM does, so the
    cost per token does not grow with the length of the generation.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int]):
        self.decode = decode
        self.ids = list(prompt_ids[-CONTEXT:])
        self.prefix = 0               # start of the decoding window
        self.read = len(self.ids)     # tokens before this are already emitted as text

    def add(self, token: int) -> str:
        """The text `token` completes (empty while it ends in an unfinished character)."""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is still held back, unfinished characters included (the generation has ended)."""
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopMatcher:
    """Cuts text at the first stop sequence; holds back a tail that could still be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop sequence was reached)."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buffer[:min(hits)], True
        keep = max(_partial_suffix(buffer, s) for s in self.stops)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back tail, released because no more text will come."""
        held, self.held = self.held, ""
        return held


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
