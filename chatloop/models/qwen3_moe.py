"""Qwen3-MoE (``qwen3_moe``: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, sparse MLPs.

Attention is Llama's with queries and keys RMS-normalised over each head's D values (``q_norm``, ``k_norm``,
weights [D]) before rotary, and ``head_dim`` set apart from hidden / heads. Layer ``i``'s MLP is sparse
(``mlp.gate`` router, ``mlp.experts.N.{gate,up,down}_proj``, of ``moe_intermediate_size``) where
:meth:`~chatloop.models.moe.MoEArgs.is_sparse` says so (``decoder_sparse_step``, ``mlp_only_layers``), else dense
(``mlp.{gate,up,down}_proj`` of ``intermediate_size``). Routing: softmax over all experts, top-k, renormalised
with ``norm_topk_prob``.

Shape legend: B sequences, T new tokens, C hidden size, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .llama import MLP, RMSNorm
from .moe import MoEStage, SparseMoE
from .qwen3 import NormedAttention

__all__ = ["Qwen3MoeStage"]

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


class Qwen3MoeAttention(NormedAttention):
    """Qwen3's attention (``q_norm``/``k_norm`` over each head's D values before rotary, see
    :class:`~chatloop.models.qwen3.NormedAttention`); its output projection has a bias where ``attention_bias``
    says so, as transformers' Qwen3-MoE has it."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        if args.attention_bias:
            self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=True)


class Qwen3MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        assert args.moe is not None
        self.self_attn = Qwen3MoeAttention(args, layer)
        self.mlp = SparseMoE(args.hidden_size, args.moe, EXPERT_NAMES) if args.moe.is_sparse(layer) else MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), (cos, signed_sin), batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3MoeStage(MoEStage):
    """A contiguous range of Qwen3-MoE layers; parameter names are the checkpoint's."""

    layer_class = Qwen3MoeLayer
