"""What all stages share: the interface, causal attention over the paged cache, and the head.

Shape legend: B sequences, T new tokens, C hidden size, H heads, K kv heads, D head dim,
S context slots (block table length x block size), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .layer_range import LayerRange

__all__ = ["StageModel", "attend"]


def attend(
    q: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, batch: StepBatch,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` [B, T, H, D] over the cached context plus the new ``k``/``v`` [B, T, K, D].

    ``scale`` multiplies the scores (None: 1/sqrt(D), the kernels' own; Granite's attention_multiplier...)."""
    if cache.decode_in_place:
        cache.write(layer, k, v)
        if scale is not None:  # the kernel scales by 1/sqrt(D)
            q = q * (scale * q.shape[-1] ** 0.5)
        return cache.decode_attention(layer, q)
    context_k, context_v = cache.update(layer, k, v)  # [B, S, K, D]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), context_k.transpose(1, 2), context_v.transpose(1, 2), attn_mask=cache.mask_of(layer),
        enable_gqa=True,
        scale=scale,
    )
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)  # [B, T, H*D]


class StageModel(nn.Module):
    """The model with the modules of other stages left out.

    Parameter names equal the Hugging Face checkpoint's (layers keep their global index), so a
    partition file loads with ``load_state_dict`` as it is. The first stage embeds token ids,
    the last one returns logits; the others map hidden states to hidden states.
    """

    embedding_path = ""
    """Where a family keeps the token embedding, which a tied head reads (e.g. ``model.embed_tokens``)."""

    def __init__(self, args: ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> None:
        super().__init__()
        if layers.end >= args.num_layers:
            raise ValueError(f"layers {layers} are past the model's last layer {args.num_layers - 1}")
        self.args = args
        self.layers_range = layers
        self.is_first = is_first
        self.is_last = is_last
        self.lm_head: nn.Module | None = None  # an untied head; a tied one reads the token embedding
        self.native_attention = False
        """Its caches run decode attention on ChatLoop's kernel (set by the loader where it can)."""
        self.decode_kernel = None
        """Runs a decode step's layers in one native call (set by the loader where it can, see
        :mod:`~chatloop.models.fused_decode`): called as ``decode_kernel(x, batch, cache, *layer_inputs)``."""

    def new_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                  num_window_blocks: int = 0) -> PagedKVCache:
        """A KV block pool for this stage's layers (and, with ``num_window_blocks``, one of its own for its windowed
        layers where the model has full layers too)."""
        dtype = dtype or next(self.parameters()).dtype
        a = self.args
        windowed = None if a.layer_types is None else frozenset(
            i for i in self.layers_range.indices if a.layer_types[i] == "sliding_attention")
        return PagedKVCache(
            self.layers_range.indices, num_blocks, block_size, a.num_kv_heads, a.head_dim, dtype,
            native_attention=self.native_attention and dtype in (torch.float32, torch.bfloat16),
            window=a.sliding_window if windowed is None or windowed else None,
            windowed_layers=windowed, num_window_blocks=num_window_blocks if a.mixed_window is not None else 0,
        )

    def forward(
        self, inputs: torch.Tensor, batch: StepBatch, cache: PagedKVCache, all_logits: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Token ids [B, T] (first stage) or hidden states [B, T, C] in; hidden states or logits out.

        The last stage returns float32 logits of each sequence's last real token [B, V], of every
        token [B, T, V] with ``all_logits``, or its hidden states before :meth:`head` with ``hidden``.
        """
        cache.begin(batch)
        x = self.embed(inputs, batch) if self.is_first else inputs
        shared = self.layer_inputs(batch, x.dtype)  # computed once per micro-batch, used by every layer
        # (the one-call step has no window: a windowed step attends layer by layer, on the attention kernel)
        # (nor two pools: the call reads one block table for every layer)
        if self.decode_kernel is not None and cache.decode_in_place and cache.window_starts is None \
                and not cache.split and x.dtype == torch.float32:
            x = self.decode_kernel(x, batch, cache, *shared)
        else:
            for layer in self.decoder_layers():
                x = layer(x, batch, cache, *shared)
        if not self.is_last or hidden:
            return x
        if not all_logits and x.shape[1] > 1:  # (a decode step's one token is its last)
            x = x[torch.arange(x.shape[0]), batch.last_token_index][:, None]  # [B, 1, C]
        logits = self.head(x).float()
        return logits if all_logits else logits[:, 0]

    # Family hooks.
    def embed(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        raise NotImplementedError

    def decoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def layer_inputs(self, batch: StepBatch, dtype: torch.dtype) -> tuple:
        """Extra arguments every layer takes (e.g. rotary cos/sin)."""
        return ()

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the last hidden states: final norm, then the untied or tied head."""
        x = self.final_norm(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        return F.linear(x, self.get_submodule(self.embedding_path).weight)
