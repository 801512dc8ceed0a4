"""What every stage needs to know about one micro-batch besides its activations.

Shape legend: B sequences, T new tokens per sequence (padded), N blocks per block table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["StepBatch", "padded"]


def padded(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """int64 [len(rows), longest row] of ``rows``, each right-padded with 0 (one tensor call, not one per row)."""
    width = max(len(row) for row in rows)
    return torch.tensor([[*row] + [0] * (width - len(row)) for row in rows], dtype=torch.long)


@dataclass
class StepBatch:
    """Positions and KV block tables of one micro-batch, identical on every stage.

    Sequences are padded to the longest one in the micro-batch; padded tokens have
    ``valid == False``: they write nothing to the cache and their outputs are ignored.
    """

    positions: torch.Tensor  # [B, T] int64, position of each new token in its sequence
    valid: torch.Tensor  # [B, T] bool, False for padding
    block_tables: torch.Tensor  # [B, N] int64, the cache blocks of each sequence, in order
    block_size: int
    window_tables: torch.Tensor | None = None
    """[B, N] int64: where a model mixes windowed and full layers, the blocks of the windowed layers' own pool (a
    table that slides with the window: entries before it name a live block, masked); None: one table for all."""

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], block_tables: list[list[int]], block_size: int,
              window_tables: list[list[int]] | None = None) -> StepBatch:
        """A batch where sequence ``b`` adds ``lengths[b]`` tokens after its first ``starts[b]``."""
        num_tokens = max(lengths)
        offsets = torch.arange(num_tokens)
        positions = torch.tensor(starts)[:, None] + offsets[None, :]
        valid = offsets[None, :] < torch.tensor(lengths)[:, None]
        return cls(positions.masked_fill(~valid, 0), valid, padded(block_tables), block_size,
                   padded(window_tables) if window_tables else None)

    @property
    def last_token_index(self) -> torch.Tensor:
        """[B] index along T of each sequence's last real token (whose logits are sampled)."""
        return self.valid.sum(dim=1) - 1

    def slots(self, tables: torch.Tensor | None = None) -> torch.Tensor:
        """[B*T] flat cache slot of every token in ``tables`` (default: :attr:`block_tables`), -1 for padding."""
        tables = self.block_tables if tables is None else tables
        block = torch.gather(tables, 1, self.positions // self.block_size)
        slots = block * self.block_size + self.positions % self.block_size
        return slots.masked_fill(~self.valid, -1).reshape(-1)

    def to_payload(self) -> tuple:
        """A compact picklable form for sending to another stage."""
        return (self.positions, self.valid, self.block_tables, self.block_size, self.window_tables)

    @classmethod
    def from_payload(cls, payload: tuple) -> StepBatch:
        return cls(*payload)
