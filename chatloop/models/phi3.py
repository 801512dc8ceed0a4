"""Phi-3 (Microsoft; Phi-3.5 and Phi-4-mini share it): Llama's layer with q/k/v and gate/up fused in the checkpoint.

Options its published checkpoints use:

- ``qkv_proj`` [H*D + 2*K*D, C] and ``gate_up_proj`` [2F, C] are kept fused, as the loader fuses Llama's.
- ``partial_rotary_factor``: rotary embeddings turn the first R = int(D * factor) values of each head only.
- ``longrope`` RoPE (the 128k variants): inverse frequencies divided by ``short_factor``, or by ``long_factor``
  once a sequence is longer than ``original_max_position_embeddings``; cos and sin scaled by the attention
  factor (given, or sqrt(1 + ln(factor) / ln(original)) with factor = max / original positions). The choice is
  made per sequence and micro-batch, from the sequence's last position, as transformers makes it per call. The
  step that feeds position ``original_max_position_embeddings`` computes the sequence again from its first token
  (the scheduler's ``rope_switch``, :attr:`~chatloop.models.ModelArgs.rope_switch`), as transformers' ``generate``
  does, so that no cached position keeps the short factors; a prompt longer than that is prefilled in one step
  however ``prefill_chunk_tokens`` would cut it, every position rotated with the long factors, as transformers
  computes it (chunks before the switch would have kept the short ones).
- ``sliding_window``: a token attends to the window's last positions only (see
  :class:`~chatloop.models.kv_cache.PagedKVCache`).

Shape legend: B sequences, T new tokens, H heads, K kv heads, D head dim, R rotated dims, F intermediate size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .layer_range import LayerRange
from .llama import MLP, Attention, DecoderLayer, LlamaStage, rope_frequencies, rotate

__all__ = ["Phi3Stage"]


def rotary_dim(args: ModelArgs) -> int:
    return int(args.head_dim * args.partial_rotary_factor)


class Phi3Attention(Attention):
    """Attention over a fused ``qkv_proj``, rotating the first R values of each query and key head."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        nn.Module.__init__(self)
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, (args.num_heads + 2 * args.num_kv_heads) * args.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)
        self.rotary_dim = rotary_dim(args)
        self.scale = None
        self.native_rope = False

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: StepBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        R = self.rotary_dim
        if self.rotary_dim == self.head_dim:
            q, k = rotate(q, *rope), rotate(k, *rope)
        else:
            q = torch.cat((rotate(q[..., :R].contiguous(), *rope), q[..., R:]), dim=-1)
            k = torch.cat((rotate(k[..., :R].contiguous(), *rope), k[..., R:]), dim=-1)
        return self.o_proj(self.attend(q, k, v, cache, batch))


class Phi3MLP(MLP):
    """SwiGLU over a fused ``gate_up_proj`` (gate rows first, as the loader fuses Llama's)."""

    def __init__(self, args: ModelArgs) -> None:
        nn.Module.__init__(self)
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)


class Phi3Layer(DecoderLayer):
    attention_class = Phi3Attention
    mlp_class = Phi3MLP


class Phi3Stage(LlamaStage):
    """A contiguous range of Phi-3 layers (Llama's tensor names, with ``qkv_proj`` and ``gate_up_proj``)."""

    layer_class = Phi3Layer
    single_call_decode = False  # the native step rotates whole heads with unscaled cos/sin

    def __init__(self, args: ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> None:
        super().__init__(args, layers, is_first, is_last)
        scaling = args.rope_scaling or {}
        self.long_inv_freq: torch.Tensor | None = None
        self.original_max_positions = 0
        self.attention_factor = 1.0
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            dim = rotary_dim(args)
            # theta^(2i/R) [R/2], divided into 1 as transformers does (bit-equal frequencies).
            powers = args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
            short, long = (torch.tensor(scaling[k], dtype=torch.float32, device="cpu")
                           for k in ("short_factor", "long_factor"))
            self.inv_freq, self.long_inv_freq = 1.0 / (short * powers), 1.0 / (long * powers)
            self.original_max_positions = scaling["original_max_position_embeddings"]
            factor = scaling.get("factor") or args.max_position_embeddings / self.original_max_positions
            default = math.sqrt(1 + math.log(factor) / math.log(self.original_max_positions)) if factor > 1 else 1.0
            self.attention_factor = scaling.get("attention_factor") or default
        else:
            self.inv_freq = rope_frequencies(args, rotary_dim(args))

    def layer_inputs(self, batch: StepBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and signed sin [B, T, 1, R] (see :func:`~chatloop.models.llama.rotate`), longrope's factors
        chosen per sequence and scaled by its attention factor."""
        inv_freq = self.inv_freq  # [R/2]
        if self.long_inv_freq is not None:
            seq_len = batch.positions.masked_fill(~batch.valid, 0).amax(dim=1) + 1  # [B]
            long = (seq_len > self.original_max_positions)[:, None, None]  # [B, 1, 1]
            inv_freq = torch.where(long, self.long_inv_freq, self.inv_freq)  # [B, 1, R/2]
        angles = batch.positions[..., None].float() * inv_freq  # [B, T, R/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, T, 1, R]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        sin[..., : sin.shape[-1] // 2].neg_()
        return cos.to(dtype), sin.to(dtype)
