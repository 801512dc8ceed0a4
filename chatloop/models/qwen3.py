"""Qwen3 (dense): Llama's layer with queries and keys RMS-normalised per head before rotary.

Qwen3 also sets ``head_dim`` apart from hidden / heads (128 with 16 heads of a 1024-wide model in Qwen3-0.6B),
has no attention bias, and ties the head in its small models only. :class:`NormedAttention` serves OLMo 2 too,
whose norms span the whole projection instead of each head.

Shape legend: B sequences, T new tokens, H heads, K kv heads, D head dim.
"""

from __future__ import annotations

import torch

from ..kernels import kernel_rope_
from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .llama import Attention, DecoderLayer, LlamaStage, RMSNorm, rotate

__all__ = ["NormedAttention", "Qwen3Stage"]


class NormedAttention(Attention):
    """Llama's attention with ``q_norm`` and ``k_norm`` (RMSNorm) applied to queries and keys before rotary.

    ``args.qk_norm`` says over what: ``"head"`` normalises each head's D values (weights [D], Qwen3, Gemma 3),
    ``"projection"`` the whole projection (weights [H*D] and [K*D], OLMo 2).
    """

    norm_class: type[RMSNorm] = RMSNorm

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        if args.qk_norm not in ("head", "projection"):
            raise ValueError(f"qk_norm {args.qk_norm!r} is not one of 'head', 'projection'")
        self.per_head = args.qk_norm == "head"
        q_size = args.head_dim if self.per_head else args.num_heads * args.head_dim
        k_size = args.head_dim if self.per_head else args.num_kv_heads * args.head_dim
        self.q_norm = self.norm_class(q_size, args.norm_eps)
        self.k_norm = self.norm_class(k_size, args.norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: StepBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if not self.per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.per_head:  # (contiguous: the norm's row kernel takes it, as the one-call decode step normalises)
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        if self.native_rope and q.dtype == torch.float32:  # in place on the row kernel, as the one-call step rotates
            q, k = q.contiguous(), k.contiguous()  # (fresh tensors: the norms' outputs or copies)
            cos, signed_sin = (r.expand(B, T, 1, self.head_dim).contiguous() for r in rope)
            kernel_rope_(q.view(B, T, -1), cos, signed_sin, 0, self.num_heads, self.head_dim)
            kernel_rope_(k.view(B, T, -1), cos, signed_sin, 0, self.num_kv_heads, self.head_dim)
        else:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return self.o_proj(self.attend(q, k, v, cache, batch))


class Qwen3Layer(DecoderLayer):
    attention_class = NormedAttention


class Qwen3Stage(LlamaStage):
    """A contiguous range of Qwen3 layers; the checkpoint's names are Llama's plus ``q_norm`` and ``k_norm``."""

    layer_class = Qwen3Layer
