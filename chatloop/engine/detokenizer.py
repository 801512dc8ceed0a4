"""Incremental detokenization with stop strings, for streaming text as tokens arrive."""

from __future__ import annotations

__all__ = ["Detokenizer"]


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Text is held back while it ends in an incomplete UTF-8 character, or while its tail could
    still become a stop string, so a stream never shows what the final text will not contain.
    Each token costs two decodes of a few ids, not one of the whole sequence: a new token is
    decoded after the tokens since the last visible text (``ids[prefix:]``), and what
    ``ids[prefix:read]`` alone decodes to is cut off the front. The context keeps the spaces
    that tokenizers strip at the start of a decode (SentencePiece) where they belong.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self._prefix = self._read = 0  # ids[_prefix:_read]: context already in self.text
        self._hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text that is now safe to show, and whether a stop string was hit."""
        self.ids.append(token)
        context = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if window.endswith("\ufffd") or len(window) <= len(context):
            return "", False  # the rest of a multi-byte character is in the next token (or nothing showed)
        self._prefix, self._read = self._read, len(self.ids)
        self.text += window[len(context) :]
        text = self.text
        if self.stop:
            search_from = max(0, self.emitted - self._hold)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                return self.flush(), True
        safe = len(text) - self._hold if self.stop else len(text)
        if safe <= self.emitted:
            return "", False
        delta, self.emitted = text[self.emitted : safe], safe
        return delta, False

    def flush(self) -> str:
        """The text still held back (at the end of the sequence)."""
        delta, self.emitted = self.text[self.emitted :], len(self.text)
        return delta
