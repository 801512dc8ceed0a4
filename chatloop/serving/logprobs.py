"""OpenAI's ``logprobs`` objects from ChatLoop's scores: the completions (legacy) form and the chat form.

A token's text is its own bytes decoded (U+FFFD where it holds part of a character; the chat form also gives
the ``bytes``). Log-probabilities below ``FLOOR`` (or -inf) are reported as ``FLOOR``, as OpenAI does, so that
every answer is valid JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine import ScoredToken

__all__ = ["FLOOR", "chat_logprobs", "completion_logprobs"]

FLOOR = -9999.0


def _logprob(value: float) -> float:
    return value if value >= FLOOR else FLOOR  # also -inf and NaN


def _text(token_bytes: Sequence[bytes], token_id: int) -> str:
    return token_bytes[token_id].decode("utf-8", errors="replace")


def completion_logprobs(token_bytes: Sequence[bytes], scored: Sequence[ScoredToken], *, first_token: int | None = None,
                        offset: int = 0) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.

    ``first_token`` leads without a score (``echo``: the prompt's first token); ``text_offset`` counts characters
    from ``offset``. Each ``top_logprobs`` entry holds the alternatives and the token itself (as vLLM's do).
    """
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []

    def add(token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        text = _text(token_bytes, token_id)
        offsets.append(offset + sum(len(t) for t in tokens))
        tokens.append(text)
        logprobs.append(logprob)
        tops.append(top)

    if first_token is not None:
        add(first_token, None, None)
    for s in scored:
        top = {_text(token_bytes, t): _logprob(lp) for t, lp in s.top}
        top.setdefault(_text(token_bytes, s.token_id), _logprob(s.logprob))
        add(s.token_id, _logprob(s.logprob), top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_bytes: Sequence[bytes], scored: Sequence[ScoredToken]) -> dict[str, Any]:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes[token_id]
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _logprob(logprob), "bytes": list(raw)}

    return {"content": [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scored]}
