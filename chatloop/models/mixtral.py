"""Mixtral (``mixtral``: Mixtral-8x7B, 8x22B): Mistral's attention, a sparse MLP in every layer.

Every layer's MLP is ``block_sparse_moe``: a router ``gate`` and experts ``experts.N.w1`` (gate), ``w3`` (up),
``w2`` (down). Routing: softmax over the top-k router logits (transformers computes it as softmax over all, top-k,
renormalised: the same weights, the same ties), the weighting done in float32. No sliding window (refused, as for
Mistral).

Shape legend: B sequences, T new tokens, C hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .llama import Attention, RMSNorm
from .moe import MoEStage, SparseMoE

__all__ = ["MixtralStage"]

EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


class MixtralLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        assert args.moe is not None
        self.self_attn = Attention(args, layer)
        self.block_sparse_moe = SparseMoE(args.hidden_size, args.moe, EXPERT_NAMES)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), (cos, signed_sin), batch, cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralStage(MoEStage):
    """A contiguous range of Mixtral layers; parameter names are the checkpoint's."""

    layer_class = MixtralLayer
