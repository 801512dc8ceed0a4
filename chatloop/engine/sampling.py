"""Sampling parameters and the sampler that the last stage runs on its logits.

Each sequence draws from its own generator, seeded from (seed, step): the same seed gives
the same tokens whatever else shares the micro-batch, and whichever stage samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "SamplerInput", "sample"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 128
    """Most tokens to generate (the prompt not counted)."""
    temperature: float = 0.0
    """0 is greedy; higher is more random."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """Above 1 makes tokens already in the sequence less likely (CTRL-style, as in transformers)."""
    seed: int | None = None
    """Same seed, same output; None draws a random seed."""
    stop: tuple[str, ...] = ()
    """Stop before any of these strings; they are not returned."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
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
