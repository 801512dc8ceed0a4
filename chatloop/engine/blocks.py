"""The coordinator's KV block allocator: which blocks of every stage's pool each sequence owns."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BlockAllocator"]


class BlockAllocator:
    """Hands out block numbers from a fixed pool; every block given out must come back.

    A sequence reserves the blocks for its whole length (prompt + max_new_tokens) when it is
    admitted, so a running sequence never waits for memory and nothing has to be preempted.
    Under a sliding window on every layer it reserves only what its window spans and gives back
    the blocks that fall out of it (see :class:`~chatloop.engine.policy.SchedulerPolicy`).
    Not thread-safe: its one owner, the scheduling policy, is called under the scheduler's lock.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` tokens, or None when they are not free now."""
        return self.take(self.blocks_for(num_tokens))

    def take(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` blocks, or None when they are not free now."""
        if num_blocks > len(self._free):
            return None
        return [self._free.pop() for _ in range(num_blocks)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        assert len(self._free) <= self.num_blocks, "a block was freed twice"

    @contextmanager
    def reserved(self, num_tokens: int) -> Iterator[list[int]]:
        """``with allocator.reserved(n) as blocks:`` - the blocks go back however the block ends."""
        blocks = self.allocate(num_tokens)
        if blocks is None:
            raise MemoryError(f"no room for {num_tokens} tokens: {self.num_free} of {self.num_blocks} blocks free")
        try:
            yield blocks
        finally:
            self.free(blocks)
