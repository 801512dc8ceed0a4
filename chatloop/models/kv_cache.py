"""A stage's share of the paged KV cache: a preallocated pool of blocks for its own layers.

Shape legend: L layers of this stage, S slots (blocks x block_size), K kv heads, D head dim,
B sequences, T new tokens, N blocks per block table.

The coordinator owns the block tables (which blocks each sequence uses); every stage holds
the same block numbers for its own layers, so one table indexes the whole pipeline. A model that mixes windowed
and full-attention layers (:attr:`~chatloop.models.ModelArgs.mixed_window`: Gemma 2/3...) may keep its windowed
layers' keys and values in a second pool of ``num_window_blocks`` blocks, indexed by each sequence's window table
(:attr:`~chatloop.models.StepBatch.window_tables`), whose blocks out of the window the coordinator reuses.
"""

from __future__ import annotations

import torch

from ..kernels import kernel_decode_attention
from .batch import StepBatch

__all__ = ["IN_PLACE_MAX_TOKENS", "PagedKVCache", "blocks_for_budget", "blocks_for_stage", "bytes_per_block"]

IN_PLACE_MAX_TOKENS = 17
"""New tokens of a sequence up to which a step attends in place, one row a token (:attr:`PagedKVCache.decode_in_place`):
a decode step's one, a speculative verify step's k <= 16 drafts and the token before them. Longer steps (prefill)
gather their context for SDPA, whose matmuls beat a row at a time there."""


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes that one block (keys and values) takes on a stage with ``num_layers`` layers."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def blocks_for_budget(budget_mb: float, **shape) -> int:
    """How many blocks fit in ``budget_mb`` MiB for the given layer count and shape."""
    return int(budget_mb * 2**20 // bytes_per_block(**shape))


def blocks_for_stage(budget_mb: float, block_size: int, args, num_layers: int, dtype: torch.dtype) -> int:
    """How many blocks a stage of ``num_layers`` layers of the model ``args`` (ModelArgs) fits in ``budget_mb``."""
    return blocks_for_budget(
        budget_mb, num_layers=num_layers, block_size=block_size, num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim, dtype=dtype
    )


class PagedKVCache:
    """Keys and values of ``layer_indices`` (global layer numbers) in ``num_blocks`` blocks."""

    def __init__(
        self,
        layer_indices: range,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        native_attention: bool = False,
        window: int | None = None,
        windowed_layers: frozenset[int] | None = None,
        num_window_blocks: int = 0,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache has room for {num_blocks} blocks: raise kv_cache_mb or lower block_size")
        self.layer_offset = layer_indices.start
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_window_blocks = num_window_blocks if window is not None and windowed_layers is not None else 0
        """Blocks of the windowed layers' own pool (0: none, every layer in the one pool)."""
        # Each layer's pool and index in it: with two pools, full layers in one, windowed layers in the other.
        windowed = [i for i in layer_indices if self.num_window_blocks and i in windowed_layers]
        full = [i for i in layer_indices if i not in windowed]
        shape = (len(full), num_blocks * block_size, num_kv_heads, head_dim)
        # Zeros, not empty: touching every page now keeps the first requests fast and the
        # padded slots of a gathered block finite.
        self.keys = torch.zeros(shape, dtype=dtype)  # [L, S, K, D]
        self.values = torch.zeros(shape, dtype=dtype)
        window_shape = (len(windowed), self.num_window_blocks * block_size, num_kv_heads, head_dim)
        self.window_keys = torch.zeros(window_shape, dtype=dtype)  # [L_windowed, S_window, K, D] (L_windowed=0: none)
        self.window_values = torch.zeros(window_shape, dtype=dtype)
        # Looked up once here, not per layer and step: (keys, values, index in them, in the windowed pool).
        self._pools = {layer: (self.keys, self.values, k, False) for k, layer in enumerate(full)} | {
            layer: (self.window_keys, self.window_values, k, True) for k, layer in enumerate(windowed)}
        self._window_slots: torch.Tensor | None = None
        self._window_skip = 0
        self._slots: torch.Tensor | None = None
        self._write_index: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.native_attention = native_attention
        """Decode steps attend on ChatLoop's kernel, reading the blocks in place (float32 or bfloat16 caches)."""
        self.decode_in_place = False
        """This micro-batch attends in place, each new token a row of its own: set by :meth:`begin`."""
        self.window = window
        """A sliding attention window: a token sees itself and the ``window - 1`` positions before it (None: all)."""
        self.windowed_layers = windowed_layers
        """The (global) layers the window applies to; None: all (Gemma alternates windowed and full layers)."""
        self.window_mask: torch.Tensor | None = None
        self.window_starts: torch.Tensor | None = None
        """Where this micro-batch decodes in place and a window cuts it: the first position each new token sees in
        the windowed layers (the kernel reads no block before it). None otherwise."""
        self._skip = 0  # leading blocks of the block tables that no layer of this stage reads in this micro-batch

    @property
    def num_bytes(self) -> int:
        return 2 * (self.keys.numel() + self.window_keys.numel()) * self.keys.element_size()

    @property
    def split(self) -> bool:
        """The windowed layers' keys and values are in a pool of their own, indexed by the window tables."""
        return self.num_window_blocks > 0

    def _pool(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """``layer``'s (keys, values, index in them, whether it is in the windowed layers' own pool)."""
        return self._pools[layer]

    def begin(self, batch: StepBatch) -> None:
        """Compute the slots of a micro-batch once, before its first layer runs."""
        slots = batch.slots()
        self._write_index = torch.nonzero(slots >= 0).squeeze(1)
        self._slots = slots[self._write_index]
        self._batch = batch
        if self.split:
            if batch.window_tables is None:
                raise ValueError("this stage keeps its windowed layers' keys and values in a pool of their own: "
                                 "each micro-batch must carry window tables (StepBatch.window_tables)")
            self._window_slots = batch.slots(batch.window_tables)[self._write_index]
        T = batch.positions.shape[1]
        self.decode_in_place = self.native_attention and T <= IN_PLACE_MAX_TOKENS
        if self.decode_in_place:  # each new token a row of its own, which sees positions 0..its own
            # Every row's key and value are written before any row attends, so a verify step's row i sees rows < i
            # of its sequence through the cache, as the causal mask lets it on SDPA's path.
            self._rows = None if T == 1 and bool(batch.valid.all()) else self._write_index
            self._lengths = batch.positions.reshape(-1) + 1
            self._tables = batch.block_tables
            self._window_tables = batch.window_tables if self.split else None
            if self._rows is not None:
                self._lengths = self._lengths.index_select(0, self._rows)
                self._tables = self._tables.repeat_interleave(T, 0).index_select(0, self._rows)
                if self._window_tables is not None:
                    self._window_tables = self._window_tables.repeat_interleave(T, 0).index_select(0, self._rows)
            self._max_length = int(self._lengths.max())
            # Windowed layers read from each token's first position in the window on (the kernel's starts).
            self.window_starts = None if self.window is None or self._max_length <= self.window else (
                self._lengths - self.window).clamp_(min=0)
            return
        # Where every layer here is windowed, the blocks before every token's window are not gathered: a step costs
        # what the window spans, however long the sequences (the coordinator may have given those blocks up).
        self._skip = 0
        before_window = 0 if self.window is None else (
            max(0, int(batch.positions[:, 0].min()) - self.window + 1) // self.block_size)
        all_windowed = self.window is not None and (self.windowed_layers is None or self.windowed_layers.issuperset(
            range(self.layer_offset, self.layer_offset + len(self._pools))))
        if all_windowed:
            self._skip = before_window
        if self.split:  # the window tables' blocks before every token's window are not gathered either
            self._skip, self._window_skip = 0, before_window
            key_positions = torch.arange(before_window * self.block_size,
                                         batch.window_tables.shape[1] * self.block_size)
            visible = key_positions[None, None, None, :] <= batch.positions[:, None, :, None]
            visible &= key_positions[None, None, None, :] > batch.positions[:, None, :, None] - self.window
            self.window_mask = torch.zeros(visible.shape, dtype=self.keys.dtype).masked_fill_(~visible, float("-inf"))
            if all_windowed:  # no layer here reads the full tables
                self.mask = None
                return
        # Slot j of a gathered context holds position j (+ the skipped blocks'); a token sees the positions up to
        # its own. Additive float mask: SDPA converts a boolean one on every call (every layer).
        key_positions = torch.arange(self._skip * self.block_size, batch.block_tables.shape[1] * self.block_size)
        visible = key_positions[None, None, None, :] <= batch.positions[:, None, :, None]  # [B, 1, T, S]
        self.mask = torch.zeros(visible.shape, dtype=self.keys.dtype).masked_fill_(~visible, float("-inf"))
        if self.window is not None and not self.split:
            in_window = key_positions[None, None, None, :] > batch.positions[:, None, :, None] - self.window
            window_mask = self.mask.masked_fill(~in_window, float("-inf"))
            if self.windowed_layers is None:
                self.mask = window_mask
            else:
                self.window_mask = window_mask

    def mask_of(self, layer: int) -> torch.Tensor | None:
        """The additive attention mask [B, 1, T, S] of ``layer`` for the micro-batch :meth:`begin` set up."""
        if self.window_mask is not None and layer in self.windowed_layers:
            return self.window_mask
        return self.mask

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new ``k``/``v`` [B, T, K, D] of ``layer`` (padding left out)."""
        assert self._slots is not None, "begin() must run before the layers"
        keys, values, i, windowed = self._pool(layer)
        slots = self._window_slots if windowed else self._slots
        num_kv_heads, head_dim = k.shape[2], k.shape[3]
        flat_k = k.reshape(-1, num_kv_heads, head_dim).index_select(0, self._write_index)
        flat_v = v.reshape(-1, num_kv_heads, head_dim).index_select(0, self._write_index)
        keys[i].index_copy_(0, slots, flat_k.to(keys.dtype))
        values[i].index_copy_(0, slots, flat_v.to(values.dtype))

    def in_place_step(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Where the micro-batch that :meth:`begin` set up decodes in place (:attr:`decode_in_place`), its rows:
        (which of the flattened [B*T] tokens they are, None where all of them in order; the slot [R] each row's
        key and value go to; each row's block table [R, N] (its sequence's); how many positions each row attends
        to [R]; their maximum). The tensors int64 and contiguous."""
        if not self.decode_in_place or self.split:
            raise RuntimeError("in_place_step: this micro-batch does not decode in place in one pool")
        return (self._rows, self._slots.contiguous(), self._tables.contiguous(), self._lengths.contiguous(),
                self._max_length)

    def decode_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the new tokens' ``q`` [B, T, H, D] over ``layer``'s cache, read in place; [B, T, H*D]
        (padding's rows zero).

        Only where :attr:`decode_in_place`; :meth:`write` must have stored the step's keys and values.
        """
        keys, values, i, windowed = self._pool(layer)
        B, T, H, D = q.shape
        rows = q.reshape(B * T, H, D).float()
        if self._rows is not None:
            rows = rows.index_select(0, self._rows)
        starts = self.window_starts if self.windowed_layers is None or layer in self.windowed_layers else None
        tables = self._window_tables if windowed else self._tables
        out = kernel_decode_attention(rows, keys[i], values[i], tables, self.block_size,
                                      self._lengths, self._max_length, starts).view(-1, H * D)
        if self._rows is not None:
            out = out.new_zeros(B * T, H * D).index_copy_(0, self._rows, out)
        return out.view(B, T, -1).to(q.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k``/``v`` [B, T, K, D] of ``layer``; return its whole context [B, N*block_size, K, D]
        (less the blocks before every token's window, where every layer here is windowed)."""
        self.write(layer, k, v)
        keys, values, i, windowed = self._pool(layer)
        num_kv_heads, head_dim = k.shape[2], k.shape[3]
        if windowed:
            tables = self._batch.window_tables[:, self._window_skip :]  # [B, N]
        else:
            tables = self._batch.block_tables[:, self._skip :]  # [B, N]
        shape = (tables.shape[0], tables.shape[1] * self.block_size, num_kv_heads, head_dim)
        # index_select over a 2-D view of whole blocks: advanced indexing (pool[tables]) took
        # 10-100x longer here and was 40% of a SmolLM2 decode step (py-spy).
        flat_tables = tables.reshape(-1)
        num_blocks = keys.shape[1] // self.block_size
        context_k = keys[i].view(num_blocks, -1).index_select(0, flat_tables).view(shape)
        context_v = values[i].view(num_blocks, -1).index_select(0, flat_tables).view(shape)
        return context_k, context_v
