"""What a request asks for and what it gets back: plain data, no torch.

:class:`SamplingParams` is a request's choice of sampling and stopping; :class:`SamplerInput`
is the small, picklable part of it the last stage needs for one step (:class:`SampledToken` is
what it returns when log-probabilities were asked for); :class:`SequenceEvent` is what the
request's consumer receives, the last one with a :class:`FinishReason`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "GREEDY_BELOW", "MAX_LOGPROBS", "MAX_REPETITION_PENALTY", "MAX_SPECULATIVE_TOKENS", "MAX_TEMPERATURE",
    "MIN_REPETITION_PENALTY", "SPECULATIVE_METHODS", "AcceptedTokens", "FinishReason", "SampledToken",
    "SamplerInput", "SamplingParams", "ScoredToken", "SequenceEvent",
]

MAX_TEMPERATURE = 2.0
GREEDY_BELOW = 1e-5
"""Temperatures below this pick the most likely token (the limit of sampling as the temperature goes to 0)."""
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0
MAX_LOGPROBS = 20
"""The most alternatives a token's log-probability comes with (OpenAI's chat API allows 20)."""
MAX_SPECULATIVE_TOKENS = 16
"""The most tokens a speculative step drafts (``speculative.num_tokens``)."""
SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 128
    """Most tokens to generate (the prompt not counted); 0 scores the prompt only (with ``prompt_logprobs``)."""
    temperature: float = 0.0
    """0 to 2: 0 (and anything below ``GREEDY_BELOW``) is greedy; higher is more random."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """In (0, 1]: keep the smallest set of tokens whose probability reaches top_p (at least the most likely)."""
    repetition_penalty: float = 1.0
    """0.01 to 10: above 1 makes tokens already in the sequence less likely (CTRL-style, as in transformers)."""
    seed: int | None = None
    """Same seed, same output; None draws a random seed."""
    stop: tuple[str, ...] = ()
    """Stop before any of these strings; they are not returned."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    timeout_s: float | None = None
    """End the request with an error if it has not finished this many seconds after it was submitted (waiting in
    the queue, and any wait while the cluster replaces a lost worker, included). None: no limit."""
    logprobs: int | None = None
    """Return each generated token's log-probability with this many most likely alternatives (0 to
    ``MAX_LOGPROBS``); None: none. Log-probabilities are the model's own (log-softmax of its logits), whatever
    the temperature, penalty, top-k or top-p that picked the token."""
    prompt_logprobs: bool = False
    """Also score the prompt: the log-probability of each prompt token after the first, given those before it
    (with ``logprobs`` alternatives each)."""
    speculative_method: str | None = None
    """Override the server's ``speculative.method`` for this request: ``ngram``, ``draft`` (only where the server
    loaded a draft model) or ``off``; None: the server's."""
    speculative_tokens: int | None = None
    """Override ``speculative.num_tokens`` (k, 1 to ``MAX_SPECULATIVE_TOKENS``) for this request; 0 turns
    speculation off for it; None: the server's."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= (0 if self.prompt_logprobs else 1),
             f"max_new_tokens must be >= 1 (0 only to score the prompt, with prompt_logprobs), "
             f"got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
             f"temperature must be from 0 to {MAX_TEMPERATURE:g}, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (math.isfinite(self.repetition_penalty)
             and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"repetition_penalty must be from {MIN_REPETITION_PENALTY:g} to {MAX_REPETITION_PENALTY:g} "
             f"(1 disables it), got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.timeout_s is None or (math.isfinite(self.timeout_s) and self.timeout_s > 0),
             f"timeout_s must be > 0 seconds or None, got {self.timeout_s}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be from 0 to {MAX_LOGPROBS} alternatives, or None, got {self.logprobs}"),
            (self.speculative_method in (None, "off", *SPECULATIVE_METHODS),
             f"speculative_method must be ngram, draft, off or None (the server's), got {self.speculative_method!r}"),
            (self.speculative_tokens is None or (isinstance(self.speculative_tokens, int)
                                                 and 0 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS),
             f"speculative_tokens must be from 1 to {MAX_SPECULATIVE_TOKENS} (0: no speculation), or None, "
             f"got {self.speculative_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplerInput:
    """What the last stage needs to sample one sequence's next token (small, picklable)."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    step: int
    history: tuple[int, ...] = ()  # token ids so far, sent only when repetition_penalty != 1
    logprobs: int | None = None
    """Score the sampled token, with this many alternatives (None: do not)."""
    targets: tuple[int, ...] = ()
    """Prompt scoring: the token ids that follow this step's tokens ``score_from``, ``score_from`` + 1, ...;
    each is scored given the tokens up to its predecessor."""
    score_from: int = 0
    drafts: tuple[int, ...] = ()
    """Speculative decoding: the drafted token ids fed after the sequence's last token, to verify; the answer is
    then :class:`AcceptedTokens`."""
    draft_probs: Any = None
    """The draft's probabilities of each drafted token's place (float32 [len(drafts), V]) where it sampled them;
    None: each draft is certain (n-gram lookup, or a greedy draft)."""

    @property
    def scores(self) -> bool:
        """The last stage needs more than the last token's logits: scores, or drafts to verify."""
        return self.logprobs is not None or bool(self.targets) or bool(self.drafts)


@dataclass(frozen=True)
class ScoredToken:
    """A token and its log-probability under the model, with the most likely alternatives at its place."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability), most likely first."""


@dataclass(frozen=True)
class SampledToken:
    """The last stage's answer for one sequence when it asked for scores (else a plain token id)."""

    token_id: int
    scored: ScoredToken | None = None
    """The sampled token's score, when ``logprobs`` was asked for."""
    prompt: tuple[ScoredToken, ...] = ()
    """The scores of ``targets``."""


@dataclass(frozen=True)
class AcceptedTokens:
    """The last stage's answer for a sequence whose drafts it verified: the accepted drafts, then one token of its
    own (the correction of the first rejected draft, or the one after the last draft)."""

    token_ids: tuple[int, ...]
    num_drafted: int
    scored: tuple[ScoredToken, ...] = ()
    """With ``logprobs``: the score of each of ``token_ids``."""

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


class FinishReason(str, Enum):
    """Why a sequence ended: the ``finish_reason`` of its last event."""

    STOP = "stop"
    """An end-of-sequence token or a stop string."""
    LENGTH = "length"
    """max_new_tokens reached."""
    CANCELLED = "cancelled"
    """The consumer cancelled it, or the engine shut down."""
    ERROR = "error"
    """The pipeline failed; the event carries the error."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SequenceEvent:
    """What a request's consumer receives: new text and token ids, then a final event."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    """Set on the last event only."""
    error: BaseException | None = None
    """With ``FinishReason.ERROR``: what failed."""
    logprobs: tuple[ScoredToken, ...] = ()
    """With ``logprobs``: the score of each of ``token_ids``."""
    prompt_logprobs: tuple[ScoredToken, ...] | None = None
    """With ``prompt_logprobs``, on the sequence's first event: the scores of its prompt tokens after the first."""
    cached_tokens: int | None = None
    """On the last event: the prompt tokens whose keys and values came from the prefix cache, not computed."""
    drafted_tokens: int | None = None
    """On the last event: tokens drafted for the request by speculative decoding (None: it did not speculate)."""
    accepted_tokens: int | None = None
    """On the last event: of those, the tokens the model accepted."""
