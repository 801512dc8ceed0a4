"""The coordinator's KV block allocator: which blocks of every stage's pool each sequence holds, and the prefix cache.

One block number names the same block in every stage's pool (the coordinator sends the block tables with each
micro-batch), so the cache of prefixes lives here, on the coordinator, for every stage at once.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["BlockAllocator", "block_hash", "window_span_blocks"]


def window_span_blocks(window: int, step: int, block_size: int) -> int:
    """The most KV blocks a sequence attending within ``window`` positions holds at once while it runs steps of
    ``step`` tokens: a step from position p reads and writes the logical blocks (p - window + 1) // block_size to
    (p + step - 1) // block_size, at most (window + step - 2) // block_size + 2 of them."""
    return (window + step - 2) // block_size + 2


def block_hash(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The content hash of a full block: of its tokens and of the hash of the block before it (None for the first),
    so that equal hashes mean equal prefixes up to the end of the block (SHA-256: no collision to fear)."""
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


class BlockAllocator:
    """Hands out block numbers from a fixed pool; every block given out must come back.

    A sequence reserves the blocks for its whole length (prompt + max_new_tokens) when it is
    admitted, so a running sequence never waits for memory and nothing has to be preempted.
    Under a sliding window on every layer it reserves only what its window spans and gives back
    the blocks that fall out of it (see :class:`~chatloop.engine.policy.SchedulerPolicy`).

    The prefix cache: a full block whose keys and values are computed can be :meth:`cache` d under its content hash
    (:func:`block_hash`); it then outlives its sequence. A block may be held by several sequences at once
    (:meth:`share`: a reference each, all reading, none writing it) and goes back when the last lets go (:meth:`free`):
    a cached one to the cached blocks no one holds, least recently used first, which count as free and are evicted
    (forgotten) only when :meth:`take` finds no empty block. :meth:`clear_cache` forgets every hash (the stages lost
    their keys and values).

    Not thread-safe: its one owner, the scheduling policy, is called under the scheduler's lock.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # empty blocks (the next one given out last)
        self._holders: dict[int, int] = {}  # blocks given out: how many sequences hold each
        self._by_hash: dict[bytes, int] = {}  # the prefix cache: content hash -> block
        self._hash_of: dict[int, bytes] = {}
        self._unheld: OrderedDict[int, None] = OrderedDict()  # cached blocks no one holds, least recently used first
        self.evictions = 0
        """Cached blocks forgotten to make room."""

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free(self) -> int:
        """Blocks :meth:`take` can give out now: the empty ones and the cached ones no sequence holds."""
        return len(self._free) + len(self._unheld)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix cache, held or not."""
        return len(self._hash_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, num_tokens: int) -> list[int] | None:
        """Blocks for ``num_tokens`` tokens, or None when they are not free now."""
        return self.take(self.blocks_for(num_tokens))

    def take(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` blocks to write, or None when they are not free now: empty ones first, then the least
        recently used cached blocks no one holds (forgotten by the cache)."""
        if num_blocks > self.num_free:
            return None
        blocks = []
        for _ in range(num_blocks):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._unheld.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
                self.evictions += 1
            self._holders[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Let go of ``blocks`` (one reference each). Those no one holds any more go back to the pool: cached ones to
        the most recently used end of the cache (the last block of a sequence first, so it is evicted first)."""
        for block in reversed(blocks):
            holders = self._holders.get(block, 0) - 1
            assert holders >= 0, f"block {block} was freed twice"
            if holders:
                self._holders[block] = holders
                continue
            del self._holders[block]
            if block in self._hash_of:
                self._unheld[block] = None
            else:
                self._free.append(block)

    # ---- the prefix cache ----------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of ``hashes`` from the first (changes nothing)."""
        found = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def num_unheld(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` no sequence holds (they count as free until :meth:`share` d)."""
        return sum(1 for b in blocks if b in self._unheld)

    def share(self, blocks: Sequence[int]) -> None:
        """Take a reference to each of the cached ``blocks`` (from :meth:`lookup`): they are read, never written."""
        for block in blocks:
            assert block in self._hash_of, f"block {block} is not cached"
            self._unheld.pop(block, None)
            self._holders[block] = self._holders.get(block, 0) + 1

    def cache(self, block: int, content: bytes) -> bool:
        """Keep the held, full, computed ``block`` in the cache under its ``content`` hash. False when another block
        holds that content already (this one stays private and goes back empty)."""
        assert block in self._holders, f"block {block} is not held"
        known = self._by_hash.get(content)
        if known is not None:
            return known == block
        if block in self._hash_of:  # (a block has one content: it is never written once cached)
            return False
        self._by_hash[content] = block
        self._hash_of[block] = content
        return True

    def clear_cache(self) -> int:
        """Forget every cached block (the stages' keys and values are gone); held ones go back empty when let go.
        Returns how many were forgotten."""
        forgotten = len(self._hash_of)
        self._free.extend(self._unheld)
        self._unheld.clear()
        self._by_hash.clear()
        self._hash_of.clear()
        return forgotten

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
