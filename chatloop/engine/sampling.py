"""The sampler that the last stage runs on its logits.

Each sequence draws from its own generator, seeded from (seed, step): the same seed gives
the same tokens whatever else shares the micro-batch, and whichever stage samples.
"""

from __future__ import annotations

import math

import torch

from .requests import SamplerInput

__all__ = ["sample"]


def sample(logits: torch.Tensor, inputs: list[SamplerInput]) -> list[int]:
    """One token id per row of ``logits`` [B, V] (float32)."""
    tokens = []
    for row, p in zip(logits, inputs):
        if p.repetition_penalty != 1.0 and p.history:
            seen = torch.tensor(sorted(set(p.history)), dtype=torch.long)
            picked = row[seen]
            row = row.clone()
            row[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.temperature == 0:
            tokens.append(int(row.argmax()))
            continue
        row = row / p.temperature
        if p.top_k:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, -math.inf)
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
            row = row.index_put((order[drop],), torch.tensor(-math.inf))
        generator = torch.Generator().manual_seed((p.seed * 1_000_003 + p.step) % 2**63)
        tokens.append(int(torch.multinomial(row.softmax(-1), 1, generator=generator)))
    return tokens
