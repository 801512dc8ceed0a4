"""Log-probabilities on the last stage: of the token it samples, and of given prompt tokens.

Only the scores travel back (a token id, a float and a few alternatives each), never a [T, V] logits
tensor; the head runs over a scored prompt in pieces, so memory does not grow with the chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models import StepBatch
from .requests import AcceptedTokens, SampledToken, SamplerInput, ScoredToken
from .sampling import sample

__all__ = ["sample_and_score", "score_rows"]


def _verified(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, p: SamplerInput
              ) -> AcceptedTokens | str:
    """One sequence's verification (:func:`~chatloop.engine.speculation.verify`) from its hidden states [k + 1, C];
    an error message where its logits cannot be sampled (this sequence alone fails)."""
    from .speculation import verify

    logits = head(hidden[None]).float()[0]  # [k + 1, V]
    try:
        accepted = verify(logits, p)
    except Exception as e:
        return f"sampling failed: {type(e).__name__}: {e}"
    if p.logprobs is None:
        return accepted
    n = len(accepted.token_ids)
    scored = score_rows(logits[:n].log_softmax(-1), list(accepted.token_ids), p.logprobs)
    return AcceptedTokens(accepted.token_ids, accepted.num_drafted, tuple(scored))

HEAD_PIECE = 64
"""Prompt positions whose logits are computed at once ([64, V] float32: 12 MiB for a 49k vocabulary)."""


def score_rows(logprobs: torch.Tensor, targets: list[int], top: int) -> list[ScoredToken]:
    """``targets[i]``'s score under ``logprobs[i]`` [N, V] (log-softmaxed), with ``top`` alternatives."""
    picked = logprobs.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(targets)
    return [ScoredToken(t, lp, alt) for t, lp, alt in zip(targets, picked, alternatives)]


def sample_and_score(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, batch: StepBatch, inputs: list[SamplerInput]
) -> list[int | str | SampledToken]:
    """Sample each sequence's next token from the last stage's final hidden states ``hidden`` [B, T, C] (before
    the head), and score what ``inputs`` ask for: a plain token id (or error message) where nothing is asked.
    A sequence with drafts gets the tokens its verification yields (:class:`AcceptedTokens`)."""
    last = hidden[torch.arange(hidden.shape[0]), batch.last_token_index][:, None]  # [B, 1, C]
    logits = head(last).float()[:, 0]
    plain = [i for i, p in enumerate(inputs) if not p.drafts]
    tokens: list[int | str] = [0] * len(inputs)
    for i, token in zip(plain, sample(logits[plain], [inputs[i] for i in plain])):
        tokens[i] = token
    out: list[int | str | SampledToken | AcceptedTokens] = []
    for b, (token, p) in enumerate(zip(tokens, inputs)):
        if p.drafts:
            out.append(_verified(head, hidden[b, : len(p.drafts) + 1], p))
            continue
        if isinstance(token, str) or not p.scores:
            out.append(token)
            continue
        top = p.logprobs or 0
        scored = score_rows(logits[b : b + 1].log_softmax(-1), [token], top)[0] if p.logprobs is not None else None
        prompt: list[ScoredToken] = []
        for i in range(0, len(p.targets), HEAD_PIECE):
            rows = hidden[b, p.score_from + i : p.score_from + min(i + HEAD_PIECE, len(p.targets))]
            logprobs = head(rows[None]).float()[0].log_softmax(-1)
            prompt.extend(score_rows(logprobs, list(p.targets[i : i + HEAD_PIECE]), top))
        out.append(SampledToken(token, scored, tuple(prompt)))
    return out
