"""OLMo 2 (AI2): norms after each sublayer instead of before, q/k RMSNorm over the whole projection.

A layer is ``x = x + post_attention_layernorm(attn(x))``, then ``x = x + post_feedforward_layernorm(mlp(x))``:
no pre-norms. Queries and keys are normalised over all their heads at once (weights [H*D] and [K*D]) before
rotary (:class:`~chatloop.models.qwen3.NormedAttention` with ``qk_norm="projection"``). Its RMSNorm multiplies
by the weight before rounding to the model's dtype, where Llama's rounds first.

Shape legend: B sequences, T new tokens, C hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .llama import MLP, LlamaStage, RMSNorm
from .qwen3 import NormedAttention

__all__ = ["Olmo2Stage"]


class Olmo2RMSNorm(RMSNorm):
    """RMSNorm scaled in float32, then rounded (the same as Llama's in float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


class Olmo2Attention(NormedAttention):
    norm_class = Olmo2RMSNorm


class Olmo2Layer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(args, layer)
        self.mlp = MLP(args)
        self.post_attention_layernorm = Olmo2RMSNorm(args.hidden_size, args.norm_eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(args.hidden_size, args.norm_eps)

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> torch.Tensor:  # [B, T, C]
        x = x + self.post_attention_layernorm(self.self_attn(x, (cos, signed_sin), batch, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2Stage(LlamaStage):
    """A contiguous range of OLMo 2 layers (Llama's tensor names, plus q/k norms and post-feedforward norms)."""

    layer_class = Olmo2Layer
    single_call_decode = False  # the native step normalises before its sublayers, not after

    def __init__(self, args: ModelArgs, *rest) -> None:
        super().__init__(args, *rest)
        if self.is_last:
            self.model.norm = Olmo2RMSNorm(args.hidden_size, args.norm_eps)
