"""The Llama family: Llama 2/3, Mistral (sliding window: see kv_cache.py), Qwen2 (attention bias), SmolLM2.

RMSNorm, rotary positions (default, linear or Llama-3 scaling), grouped-query attention,
SwiGLU, tied or untied embeddings.

Shape legend: B sequences, T new tokens, C hidden size, H heads, K kv heads, D head dim,
F intermediate size, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import kernel_rms_norm, kernel_rope_
from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .layer_range import LayerRange
from .stage_model import StageModel, attend

__all__ = ["Attention", "DecoderLayer", "LlamaStage", "MLP", "RMSNorm", "fuse_projections", "rotate",
           "use_row_kernels"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False
        """Normalise on ChatLoop's row kernel (set when loaded, see :func:`use_row_kernels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.dtype == torch.float32 and x.is_contiguous():  # ~2 us a call instead of ~16
            return kernel_rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused op instead of seven (~20 us a call here, 61 calls a step)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()  # transformers' order for narrower dtypes: normalise in float32, cast, then scale
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(args: ModelArgs, dim: int | None = None) -> torch.Tensor:
    """[dim/2] inverse frequencies (dim: the rotated part of a head, D unless given), with linear or Llama-3 scaling
    applied."""
    dim = dim or args.head_dim
    # Explicitly on the CPU: stages are built on the meta device before their weights load.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings to x [B, T, H, D] (half-split layout) with cos and ``signed_sin`` [B, T, 1, D].

    ``signed_sin`` is sin with its first half negated, so that ``x * cos + cat(-x2, x1) * sin`` is
    ``x * cos + cat(x2, x1) * signed_sin``: a flip of the halves and, in float32, one addcmul.
    """
    B, T, H, D = x.shape
    swapped = x.view(B, T, H, 2, D // 2).flip(3).view(B, T, H, D)  # cat(x2, x1)
    if x.dtype == torch.float32:
        return torch.addcmul(x * cos, swapped, signed_sin)
    return x * cos + swapped * signed_sin  # rounded twice, as transformers does: bf16 logits stay bit-equal


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        # Qwen2's bias is on q, k and v only; Llama's attention_bias (and Granite's, Qwen3's) on the output too.
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size,
                                bias=bias and args.family != "qwen2")
        self.scale = args.attention_scale
        """The scores' scale (None: 1/sqrt(D)); see :func:`~chatloop.models.stage_model.attend`."""
        self.native_rope = False
        """Rotate on ChatLoop's row kernel (set when loaded, see :func:`use_row_kernels`)."""

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: StepBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj") and self.native_rope and rope[0].dtype == torch.float32:
            qkv = self.qkv_proj(x)  # rotated in place: one call for q and k instead of eight torch ops
            cos, signed_sin = (r.expand(B, T, 1, self.head_dim).contiguous() for r in rope)
            kernel_rope_(qkv, cos, signed_sin, 0, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k, v = qkv.split(self.qkv_sizes, dim=-1)
            q = q.view(B, T, self.num_heads, self.head_dim)
            k = k.view(B, T, self.num_kv_heads, self.head_dim)
            v = v.view(B, T, self.num_kv_heads, self.head_dim)
            return self.o_proj(self.attend(q, k, v, cache, batch))
        q, k, v = self.project(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, *rope), rotate(k, *rope)
        return self.o_proj(self.attend(q, k, v, cache, batch))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache,
               batch: StepBatch) -> torch.Tensor:
        """Attention of the rotated ``q`` [B, T, H, D] over the cache and the new ``k``/``v``; [B, T, H*D]."""
        return attend(q, self.layer, k, v, cache, batch, self.scale)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, T, H*D], keys and values [B, T, K*D] of ``x`` [B, T, C], from one fused matmul or three."""
        if hasattr(self, "qkv_proj"):  # fused when loaded (fuse_projections): one matmul call, not three
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
            return q, k, v
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    @property
    def qkv_sizes(self) -> list[int]:
        return [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # fused when loaded (fuse_projections)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    attention_class: type[Attention] = Attention
    mlp_class: type[MLP] = MLP

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = self.attention_class(args, layer)
        self.mlp = self.mlp_class(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(
        self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), (cos, signed_sin), batch, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(StageModel):
    """A contiguous range of Llama-family layers, plus the embeddings and/or head at the ends.

    Families whose layers differ (see :mod:`~chatloop.models.qwen3` and its neighbours) subclass it and name their
    own ``layer_class``; one whose layer is not exactly Llama's sets ``single_call_decode`` to False.
    """

    embedding_path = "model.embed_tokens"
    layer_class: type[nn.Module] = DecoderLayer
    """The decoder layer, built as ``layer_class(args, global_index)``."""
    single_call_decode = True
    """Its layers compute exactly what :mod:`~chatloop.models.fused_decode`'s one native call computes."""

    def __init__(self, args: ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> None:
        super().__init__(args, layers, is_first, is_last)
        self.inv_freq = rope_frequencies(args)  # a plain attribute: float32, not in the state dict
        self.model = nn.Module()
        if is_first or (is_last and args.tie_word_embeddings):
            self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): self.layer_class(args, i) for i in layers.indices})
        if is_last:
            self.model.norm = RMSNorm(args.hidden_size, args.norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.layers.values())

    def layer_inputs(self, batch: StepBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and signed sin (see :func:`rotate`) [B, T, 1, D] of the micro-batch's positions."""
        return rotary_inputs(batch, self.inv_freq, dtype)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)


def rotary_inputs(batch: StepBatch, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos and signed sin (see :func:`rotate`) [B, T, 1, D] of the micro-batch's positions."""
    angles = batch.positions[..., None].float() * inv_freq  # [B, T, D/2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # [B, T, 1, D]
    sin = angles.sin()
    sin[..., : sin.shape[-1] // 2].neg_()
    return angles.cos().to(dtype), sin.to(dtype)


def fuse_projections(stage: LlamaStage, concat) -> int:
    """Merge each layer's query, key and value projections into one layer, and its gate and up projections into
    one: a decode step then makes 4 matmul calls a layer instead of 7 (each call costs microseconds beyond its
    weights). ``concat(modules)`` gives the merged layer, or None where these cannot be merged (they are then
    left as they are). Returns how many merges were made."""
    merged = 0
    for layer in stage.decoder_layers():
        attention, mlp = layer.self_attn, layer.mlp
        qkv = concat([attention.q_proj, attention.k_proj, attention.v_proj]) if hasattr(attention, "q_proj") else None
        if qkv is not None:  # (Phi-3's checkpoints hold them fused already)
            attention.qkv_proj = qkv
            del attention.q_proj, attention.k_proj, attention.v_proj
            merged += 1
        gate_up = concat([mlp.gate_proj, mlp.up_proj]) if hasattr(mlp, "gate_proj") else None
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
            merged += 1
    return merged


def use_row_kernels(stage: LlamaStage) -> None:
    """Run a float32 stage's norms and (fused) rotary embeddings on ChatLoop's row kernels."""
    for module in stage.modules():
        if isinstance(module, RMSNorm):
            module.native = True
        elif isinstance(module, Attention):
            module.native_rope = True
