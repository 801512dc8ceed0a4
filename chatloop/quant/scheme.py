"""Which tensors a quantization scheme quantizes, and to what.

- ``int8``: every linear weight and the token embedding (a tied head reads it) as ``q8_0``.
- ``int4``: the decoder layers' linear weights as ``q4_1``; the embedding and an untied head as ``q8_0``, as
  llama.cpp's 4-bit files keep them (they cost the most accuracy at 4 bits).
- ``gguf``: what a GGUF file holds, as it holds it (``q8_0``, ``q4_1``, ``q4_0``; other tensors dequantized).

Only Llama-family models (Llama, Mistral, Qwen2) and their mixture-of-experts kin (Qwen3-MoE, Mixtral) are
quantized; a matrix whose input size is not a multiple of 32 stays float32. Every expert's matrices are linear
weights like any other (``mlp.experts.N.*_proj``, ``block_sparse_moe.experts.N.w1/w2/w3``). The router
(``mlp.gate``, ``block_sparse_moe.gate``, [experts, hidden]) stays float32 in every scheme: it is a few
hundredths of a percent of an MoE layer's bytes, and int8 activations and weights there would move its logits
enough to change which experts near-tied tokens run, a larger error than any one matrix's rounding.
"""

from __future__ import annotations

import re

from .formats import BLOCK

__all__ = ["SCHEMES", "format_for", "module_kind"]

SCHEMES = ("int8", "int4", "gguf")
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp|mlp\.experts\.\d+)\.\w+_proj\.weight$"
                     r"|^model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$")
_EMBEDDING = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


def module_kind(key: str) -> str | None:
    """``linear``, ``embedding`` or ``head`` for a quantizable tensor of a Llama-family checkpoint, else None."""
    if _LINEAR.match(key):
        return "linear"
    return {_EMBEDDING: "embedding", _HEAD: "head"}.get(key)


def format_for(key: str, shape: tuple[int, ...], scheme: str) -> str | None:
    """The format ``scheme`` stores ``key`` in (None: left floating)."""
    kind = module_kind(key)
    if kind is None or len(shape) != 2 or shape[1] % BLOCK:
        return None
    if scheme == "int8":
        return "q8_0"
    if scheme == "int4":
        return "q4_1" if kind == "linear" else "q8_0"
    raise ValueError(f"quantization scheme {scheme!r}: choose one of int8, int4 (gguf comes with its file)")
