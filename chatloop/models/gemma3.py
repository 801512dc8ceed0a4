"""Gemma 3 (text; ``gemma3_text``) and Gemma 2: Llama's attention with Gemma's norms, windows and scales.

- Embeddings scaled by sqrt(hidden), the factor rounded to the model's dtype first, as transformers does.
- RMSNorm by (1 + w), computed in float32 and rounded last; norms before *and* after attention and the MLP.
- A GELU-tanh gated MLP; queries and keys RMS-normalised per head; scores scaled by query_pre_attn_scalar^-1/2.
- ``layer_types``: sliding-window layers (``sliding_window`` positions) rotate with their own base
  (``rope_local_base_freq``, default RoPE), full-attention layers with ``rope_theta`` and its scaling.
- ``final_logit_softcapping``: logits = cap * tanh(logits / cap), where set; ``attn_logit_softcapping`` the same
  on attention scores (Gemma 2), computed here in torch: such stages never decode on the attention kernel.

Gemma 2 (:class:`Gemma2Stage`) is the same without q/k norms, with one RoPE for all layers.

Shape legend: B sequences, T new tokens, C hidden size, D head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .layer_range import LayerRange
from .llama import MLP, Attention, LlamaStage, rope_frequencies, rotary_inputs
from .qwen3 import NormedAttention

__all__ = ["Gemma2Stage", "Gemma3Stage"]


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), in float32, rounded to the input's dtype last (no row kernel: it scales by
    the weight alone)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)


def attend_softcapped(q: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache,
                      scale: float, cap: float) -> torch.Tensor:
    """:func:`~chatloop.models.stage_model.attend` with scores soft-capped (cap * tanh(scores / cap)) before the
    mask, softmax in float32 (transformers' eager attention, which Gemma 2 uses); [B, T, H*D]."""
    assert not cache.decode_in_place, "soft-capped attention runs on torch's path (see Gemma3Stage.new_cache)"
    context_k, context_v = cache.update(layer, k, v)  # [B, S, K, D]
    B, T, H, D = q.shape
    repeat = H // context_k.shape[2]
    keys = context_k.transpose(1, 2).repeat_interleave(repeat, dim=1)  # [B, H, S, D]
    values = context_v.transpose(1, 2).repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)) * scale  # [B, H, T, S]
    scores = torch.tanh(scores / cap) * cap + cache.mask_of(layer)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).transpose(1, 2).reshape(B, T, H * D)


class SoftcapAttention:
    """Mixed into an attention: soft-caps its scores where ``args.attn_logit_softcapping`` is set."""

    layer: int
    scale: float | None
    softcap: float | None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache,
               batch: StepBatch) -> torch.Tensor:
        if self.softcap is None:
            return super().attend(q, k, v, cache, batch)
        return attend_softcapped(q, self.layer, k, v, cache, self.scale or q.shape[-1] ** -0.5, self.softcap)


class GemmaAttention(SoftcapAttention, NormedAttention):
    """Gemma 3's: q/k norms per head, (1 + w) scaled."""

    norm_class = GemmaRMSNorm

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.softcap = args.attn_logit_softcapping


class Gemma2Attention(SoftcapAttention, Attention):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.softcap = args.attn_logit_softcapping


class GemmaMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # fused when loaded (fuse_projections)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3Layer(nn.Module):
    attention_class: type[Attention] = GemmaAttention

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.sliding = args.layer_types is not None and args.layer_types[layer] == "sliding_attention"
        self.self_attn = self.attention_class(args, layer)
        self.mlp = GemmaMLP(args)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(args.hidden_size, args.norm_eps))

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor, signed_sin: torch.Tensor,
        local_cos: torch.Tensor, local_signed_sin: torch.Tensor,
    ) -> torch.Tensor:  # [B, T, C]
        rope = (local_cos, local_signed_sin) if self.sliding else (cos, signed_sin)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, batch, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Stage(LlamaStage):
    """A contiguous range of Gemma 3 text layers (Llama's tensor names plus Gemma's extra norms); tied head."""

    layer_class = Gemma3Layer
    single_call_decode = False

    def __init__(self, args: ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> None:
        super().__init__(args, layers, is_first, is_last)
        local = dataclasses.replace(args, rope_theta=args.local_rope_theta, rope_scaling=None)
        self.local_inv_freq = rope_frequencies(local)
        if is_last:
            self.model.norm = GemmaRMSNorm(args.hidden_size, args.norm_eps)

    def embed(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        weight = self.model.embed_tokens.weight
        return self.model.embed_tokens(token_ids) * torch.tensor(self.args.hidden_size**0.5).to(weight.dtype)

    def layer_inputs(self, batch: StepBatch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Rotary cos and signed sin [B, T, 1, D] of full-attention layers, then of sliding-window layers."""
        return (*rotary_inputs(batch, self.inv_freq, dtype), *rotary_inputs(batch, self.local_inv_freq, dtype))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().head(x)  # [B, T, V]
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def new_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                  num_window_blocks: int = 0) -> PagedKVCache:
        cache = super().new_cache(num_blocks, block_size, dtype, num_window_blocks)
        if self.args.attn_logit_softcapping is not None:
            cache.native_attention = False  # the attention kernel does not soft-cap
        return cache


class Gemma2Layer(Gemma3Layer):
    attention_class = Gemma2Attention


class Gemma2Stage(Gemma3Stage):
    """A contiguous range of Gemma 2 layers: Gemma 3's without q/k norms (its local RoPE base is the global one)."""

    layer_class = Gemma2Layer
