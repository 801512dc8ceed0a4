"""Granite (IBM, dense): Llama's layer with four scalars from config.json.

``embedding_multiplier`` scales the token embeddings, ``residual_multiplier`` each sublayer's output before the
residual add, ``attention_multiplier`` replaces 1/sqrt(D) as the attention scale (``ModelArgs.attention_scale``,
which Llama's attention already passes to :func:`~chatloop.models.stage_model.attend`), and the logits are
divided by ``logits_scaling``.

Shape legend: B sequences, T new tokens, C hidden size, V vocabulary.
"""

from __future__ import annotations

import torch

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .llama import DecoderLayer, LlamaStage

__all__ = ["GraniteStage"]


class GraniteLayer(DecoderLayer):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.residual_multiplier = args.residual_multiplier

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> torch.Tensor:
        scale = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), (cos, signed_sin), batch, cache) * scale
        return x + self.mlp(self.post_attention_layernorm(x)) * scale


class GraniteStage(LlamaStage):
    """A contiguous range of Granite layers (Llama's tensor names)."""

    layer_class = GraniteLayer  # the one-call decode step takes its two multipliers (fused_decode.py)

    def embed(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return self.model.embed_tokens(token_ids) * self.args.embedding_multiplier  # [B, T, C]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return super().head(x) / self.args.logits_scaling  # [B, T, V]
