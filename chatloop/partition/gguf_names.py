"""GGUF tensor names as the Hugging Face checkpoints of ChatLoop's families name them.

gguf-py's ``TensorNameMap`` maps Hugging Face names to GGUF names (what llama.cpp's converter uses); several
Hugging Face spellings share one GGUF name, so the reverse is not a table lookup. Here the names each family's
stages load (:data:`LAYER_TENSORS`) are mapped forward with gguf-py, per architecture, and the map reversed. A
file's stacked expert tensors (``blk.N.ffn_{gate,up,down}_exps``, ``[E, rows, cols]``) become one linear per
expert, as ChatLoop's mixture-of-experts stages load them.
"""

from __future__ import annotations

import functools
import re

__all__ = ["EXPERT_TENSORS", "LAYER_TENSORS", "gguf_to_hf"]

_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA = ("input_layernorm", "post_attention_layernorm", *_ATTENTION, *_MLP)
_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")
_GEMMA = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
          *_ATTENTION, *_MLP)

LAYER_TENSORS = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "granite": _LLAMA,
    "qwen3": (*_LLAMA, *_QK_NORM),
    "qwen3_moe": ("input_layernorm", "post_attention_layernorm", *_ATTENTION, *_QK_NORM, "mlp.gate"),
    "mixtral": ("input_layernorm", "post_attention_layernorm", *_ATTENTION, "block_sparse_moe.gate"),
    "gemma2": _GEMMA, "gemma3_text": (*_GEMMA, *_QK_NORM),
    "phi3": ("input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
             "mlp.gate_up_proj", "mlp.down_proj"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm", *_ATTENTION, *_QK_NORM, *_MLP),
}
"""The tensors (under ``model.layers.N.``) of each family's layers, as its Hugging Face checkpoints name them."""
_TOP = ("model.embed_tokens", "model.norm", "lm_head")

EXPERT_TENSORS = {
    "qwen3_moe": ("mlp.experts.{e}.", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": ("block_sparse_moe.experts.{e}.", {"gate": "w1", "up": "w3", "down": "w2"}),
}
"""Per family: an expert's prefix in a layer and its projections' names, by GGUF's ``ffn_{gate,up,down}_exps``."""
_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


@functools.cache
def _reverse_map(arch: str, family: str, num_layers: int) -> dict[str, str]:
    """{GGUF name without .weight/.bias: Hugging Face name without it} for ``family``'s tensors in an ``arch``
    file, from gguf-py's own (forward) map."""
    import gguf

    arch_id = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if arch_id is None:
        raise ValueError(f"GGUF architecture {arch!r}: gguf-py does not know it (pip install -U gguf)")
    forward = gguf.get_tensor_name_map(arch_id, num_layers)
    names = [*_TOP, *(f"model.layers.{i}.{part}" for i in range(num_layers) for part in LAYER_TENSORS[family])]
    reverse = {}
    for name in names:
        gguf_name = forward.get_name(name)
        if gguf_name is not None:
            reverse.setdefault(gguf_name, name)
    return reverse


def gguf_to_hf(name: str, arch: str, family: str, num_layers: int,
               num_experts: int = 0) -> list[tuple[str, int | None]]:
    """The Hugging Face name(s) of GGUF tensor ``name``: one ``(name, None)``, or for a stacked expert tensor
    ``(expert e's name, e)`` for every expert. ``ValueError`` for a tensor the family does not have."""
    match = _EXPERTS.match(name)
    if match and family in EXPERT_TENSORS:
        layer, part = match.groups()
        prefix, parts = EXPERT_TENSORS[family]
        return [(f"model.layers.{layer}.{prefix.format(e=e)}{parts[part]}.weight", e) for e in range(num_experts)]
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        stem, kind = name, ""
    reverse = _reverse_map(arch, family, num_layers)
    if stem not in reverse:
        raise ValueError(f"GGUF tensor {name}: a {family} model ({arch} file) as ChatLoop runs it has no such "
                         "tensor")
    return [(f"{reverse[stem]}.{kind}" if kind else reverse[stem], None)]
