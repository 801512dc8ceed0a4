"""A GGUF file's ``config.json``: transformers' GGUF config reader where it knows the architecture, completed with
what it leaves out, and read here from the metadata where it does not (Granite, OLMo 2).

What is completed follows llama.cpp (``src/models/*.cpp``, ``conversion/*.py``), which wrote and runs the file:

- every file: ``tie_word_embeddings`` from the tensors of all shards (no ``output.weight``: tied), ``head_dim``
  from ``attention.key_length`` where the file states it, the attention biases from the tensors;
- ``llama`` with ``llama.expert_count`` > 0 (Mixtral): a ``mixtral`` config with its experts;
- ``qwen3moe``: the experts' ``moe_intermediate_size`` (``expert_feed_forward_length``);
- ``gemma2``/``gemma3``: logit soft-capping, the sliding-window pattern, the local RoPE base, and the query scale
  (``1/sqrt(head_dim)``, but ``1/sqrt(hidden/heads)`` for the 27B models, as llama.cpp decides by layer count);
- ``phi3``: the rotated part of each head, the sliding window and the longrope factors (stored as tensors);
- ``llama`` with ``rope_freqs`` (Llama 3.1 and later): the llama3 RoPE scaling whose factors those are, checked
  against them (transformers' reader leaves it out: it would run such a file without its scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IGNORED_TENSORS", "TRANSFORMERS_ARCHS", "gguf_config"]

TRANSFORMERS_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
"""Architectures whose config transformers reads from a GGUF file (the ones of these ChatLoop runs)."""
_OWN = {"granite": "GraniteForCausalLM", "olmo2": "Olmo2ForCausalLM"}
"""Architectures whose config is read here: transformers has no GGUF config reader for them."""
IGNORED_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight")
"""Tensors that are config, not weights (Phi-3's longrope factors, Llama 3's RoPE frequency factors)."""
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The llama3 RoPE scaling of every Llama 3.1, 3.2 and 3.3 but its factor, which GGUF keeps only as the
per-frequency factors it computes (``rope_freqs``)."""
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _own_config(arch: str, md: dict[str, Any]) -> dict[str, Any]:
    """The Llama-like part of a config that transformers cannot read from the file."""
    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    config = {
        "model_type": arch, "architectures": [_OWN[arch]],
        "vocab_size": key("vocab_size") or len(md["tokenizer.ggml.tokens"]),
        "hidden_size": key("embedding_length"), "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "max_position_embeddings": key("context_length"), "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
    }
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in md:
            config[f"{name.replace('padding', 'pad')}_token_id"] = md[f"tokenizer.ggml.{name}_token_id"]
    if arch == "granite":  # llama.cpp's *_scale are transformers' multipliers
        config |= {"attention_multiplier": key("attention.scale", 1.0), "embedding_multiplier": key("embedding_scale",
                   1.0), "residual_multiplier": key("residual_scale", 1.0), "logits_scaling": key("logit_scale", 1.0)}
    return config


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> list[float]:
    """The per-frequency factors llama.cpp's converter writes as ``rope_freqs`` for a llama3 RoPE scaling
    (conversion/llama.py, ``generate_extra_tensors``)."""
    import torch

    base, factor = rope.get("rope_theta", 10000.0), rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _llama3_rope(config: dict[str, Any], rope_freqs: np.ndarray, path: Path) -> dict[str, Any]:
    """The llama3 RoPE scaling whose factors a Llama 3 file holds; ``ValueError`` if they are another's."""
    rope = dict(config.get("rope_parameters") or {})
    rope = {"rope_type": "llama3", "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "factor": float(rope_freqs.max()), **_LLAMA3_ROPE}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected = np.array(llama3_rope_factors(rope, head_dim), dtype=np.float32)
    if expected.shape != rope_freqs.shape or not np.allclose(expected, rope_freqs, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: its rope_freqs are not the factors of a llama3 RoPE scaling (factor "
                         f"{rope['factor']:g}, low/high frequency factors 1 and 4, original context 8192) as every "
                         "Llama 3 has: ChatLoop cannot tell which scaling they are")
    return rope


def gguf_config(first: Path, md: dict[str, Any], tensor_names: set[str],
                read: Callable[[str], np.ndarray]) -> dict[str, Any]:
    """The ``config.json`` dict of the (first shard) file ``first``: ``md`` its metadata, ``tensor_names`` the
    tensors of all its shards, ``read(name)`` a float tensor's values."""
    arch = md["general.architecture"]
    if arch in _OWN:
        config = _own_config(arch, md)
    elif arch in TRANSFORMERS_ARCHS:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(first.parent, gguf_file=first.name)
        config = hf_config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [hf_config.architectures[0] if hf_config.architectures
                                   else f"{type(hf_config).__name__.removesuffix('Config')}ForCausalLM"]
    else:
        raise ValueError(f"{first}: GGUF architecture {arch!r} is not one ChatLoop runs "
                         f"({', '.join([*TRANSFORMERS_ARCHS, *_OWN])})")

    def key(name: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{name}", default)

    config["dtype"] = "float32"
    if key("attention.key_length"):  # transformers reads it for some architectures only (not Qwen3)
        config["head_dim"] = key("attention.key_length")
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = any(n.endswith(("attn_q.bias", "attn_qkv.bias")) for n in tensor_names)
    if arch == "granite":
        config["mlp_bias"] = any(n.endswith("ffn_down.bias") for n in tensor_names)
    if arch == "llama" and key("expert_count", 0) > 0:
        config |= {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                   "num_local_experts": key("expert_count"), "num_experts_per_tok": key("expert_used_count")}
    if arch == "llama" and "rope_freqs.weight" in tensor_names:
        config["rope_parameters"] = _llama3_rope(config, read("rope_freqs.weight"), first)
        config.pop("rope_scaling", None)
    if arch == "qwen3moe":
        config["moe_intermediate_size"] = key("expert_feed_forward_length", config.get("moe_intermediate_size"))
        config |= {"decoder_sparse_step": 1, "mlp_only_layers": []}
    if arch in ("gemma2", "gemma3"):
        head_dim = key("attention.key_length")
        big = key("block_count") == _GEMMA_27B_LAYERS[arch]
        config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"] if big else head_dim
        config["final_logit_softcapping"] = key("final_logit_softcapping")
        if arch == "gemma2":
            config["attn_logit_softcapping"] = key("attn_logit_softcapping")
        pattern = key("attention.sliding_window_pattern", 6 if arch == "gemma3" else 2)
        layers = config["num_hidden_layers"]
        if isinstance(pattern, list):  # one flag a layer: sliding or not
            config["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            config["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                     for i in range(layers)]
        config.pop("sliding_window_pattern", None)
        if arch == "gemma3":
            full = {"rope_type": "default", "rope_theta": key("rope.freq_base", 1000000.0)}
            if key("rope.scaling.type") == "linear":
                full |= {"rope_type": "linear", "factor": key("rope.scaling.factor")}
            config["rope_parameters"] = {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": key("rope.freq_base_swa", 10000.0)}}
            config.pop("rope_scaling", None)
    if arch == "phi3":
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        rotated = key("rope.dimension_count", head_dim) / head_dim
        config["sliding_window"] = key("attention.sliding_window") or None
        rope = {"rope_type": "default", "rope_theta": key("rope.freq_base", 10000.0), "partial_rotary_factor": rotated}
        if "rope_factors_long.weight" in tensor_names:
            rope |= {"rope_type": "longrope", "long_factor": read("rope_factors_long.weight").tolist(),
                     "short_factor": read("rope_factors_short.weight").tolist(),
                     "original_max_position_embeddings": key("rope.scaling.original_context_length")}
            config["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        config["partial_rotary_factor"] = rotated
        config["rope_parameters"] = rope
        config.pop("rope_scaling", None)
    return config
