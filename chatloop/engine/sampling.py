"""The sampler that the last stage runs on its logits.

Each sequence draws from its own generator, seeded from (seed, step): the same seed gives
the same tokens whatever else shares the micro-batch, whichever stage samples, and after a
replay. Every value :class:`~chatloop.engine.SamplingParams` accepts is numerically safe: the
penalty and the temperature are applied in float64, temperatures below ``GREEDY_BELOW`` pick
the most likely token, and top-p always keeps the most likely token.
"""

from __future__ import annotations

import math

import torch

from .requests import GREEDY_BELOW, SamplerInput

__all__ = ["distribution", "generator", "sample"]

NOT_FINITE = "the model's logits hold NaN or infinity"


def sample(logits: torch.Tensor, inputs: list[SamplerInput]) -> list[int | str]:
    """One token id per row of ``logits`` [B, V] (float32); a row that cannot be sampled gets an error message.

    One sequence's failure never fails its neighbours: the caller ends that sequence alone.
    """
    tokens: list[int | str] = []
    for row, p in zip(logits, inputs):
        try:
            tokens.append(_sample_row(row, p))
        except Exception as e:  # numerically impossible input, or a bug: this sequence only
            tokens.append(f"sampling failed: {type(e).__name__}: {e}")
    return tokens


def generator(seed: int, step: int) -> torch.Generator:
    """The generator of a sequence's ``step``-th token: a function of its seed and the step alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def _sample_row(row: torch.Tensor, p: SamplerInput) -> int:
    logits = _processed(row, p, p.history)
    if isinstance(logits, int):
        return logits
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator(p.seed, p.step)))


def distribution(row: torch.Tensor, p: SamplerInput, history: tuple[int, ...]) -> torch.Tensor:
    """The float64 probabilities [V] that :func:`sample` draws ``row``'s token from (penalised over ``history``,
    tempered, top-k and top-p cut); one-hot at the most likely token where sampling is greedy."""
    logits = _processed(row, p, history)
    if isinstance(logits, int):
        probs = torch.zeros(row.shape[-1], dtype=torch.float64)
        probs[logits] = 1.0
        return probs
    return logits.softmax(-1)


def _processed(row: torch.Tensor, p: SamplerInput, history: tuple[int, ...]) -> torch.Tensor | int:
    """``row``'s float64 logits as sampling sees them, or the token id itself where the choice is greedy."""
    if p.temperature < GREEDY_BELOW and p.repetition_penalty == 1.0:
        # One pass, not two: argmax picks a NaN or +inf if there is one, and a -inf elsewhere cannot win.
        token = int(row.argmax())
        if not math.isfinite(row[token]):
            raise ValueError(NOT_FINITE)
        return token
    if not bool(torch.isfinite(row).all()):
        raise ValueError(NOT_FINITE)
    row = row.double()  # float64: 1/temperature and the penalty cannot overflow for any accepted value
    if p.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        picked = row[seen]
        row = row.clone()
        row[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if p.temperature < GREEDY_BELOW:  # the limit of sampling as the temperature goes to 0
        return int(row.argmax())
    row = row / p.temperature
    if p.top_k:
        kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
        row = row.masked_fill(row < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the token that crosses top_p
        drop[0] = False  # and always the most likely one, however small top_p is
        row = row.index_put((order[drop],), torch.tensor(-math.inf, dtype=row.dtype))
    return row
