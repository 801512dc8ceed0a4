"""Model hyper-parameters read from a Hugging Face ``config.json``, one dataclass for every family."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .moe import MoEArgs

__all__ = ["ModelArgs", "SUPPORTED_FAMILIES"]

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
LLAMA_LIKE = ("qwen3", "granite", "olmo2", "phi3", "gemma2", "gemma3_text")
"""Families whose config.json reads as Llama's plus a few options of their own (their modules sit beside llama.py)."""
MOE_FAMILIES = ("qwen3_moe", "mixtral")
"""Mixture-of-experts families: Llama-style attention, sparse MLPs (see :mod:`~chatloop.models.moe`)."""
SUPPORTED_FAMILIES = LLAMA_FAMILY + ("gpt2",) + LLAMA_LIKE + MOE_FAMILIES


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a decoder-only model, independent of how it is split."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    qk_norm: str | None = None
    """RMSNorm of queries and keys before rotary: "head" over each head's D (Qwen3), "projection" over all H*D."""
    mlp_bias: bool = False
    attention_scale: float | None = None
    """What the attention scores are multiplied by; None: 1/sqrt(head_dim). Granite's attention_multiplier."""
    embedding_multiplier: float = 1.0
    """Granite: the token embeddings are multiplied by it."""
    residual_multiplier: float = 1.0
    """Granite: each sublayer's output is multiplied by it before the residual add."""
    logits_scaling: float = 1.0
    """Granite: the logits are divided by it."""
    partial_rotary_factor: float = 1.0
    """Phi-3 (Phi-4-mini): rotary embeddings turn the first ``int(head_dim * factor)`` values of each head only."""
    sliding_window: int | None = None
    """A token attends to itself and the ``sliding_window - 1`` positions before it (None: to all): Phi-3,
    Mistral, Gemma, Qwen2/Qwen3 with ``use_sliding_window``; on the layers ``layer_types`` names."""
    layer_types: tuple[str, ...] | None = None
    """Gemma, Qwen2/Qwen3: "sliding_attention" (windowed) or "full_attention" per layer; None: every layer windowed
    if any."""
    local_rope_theta: float = 10000.0
    """Gemma 3: the RoPE base of sliding-window layers (rope_local_base_freq), default RoPE."""
    final_logit_softcapping: float | None = None
    """Gemma: logits = cap * tanh(logits / cap)."""
    attn_logit_softcapping: float | None = None
    """Gemma 2: attention scores = cap * tanh(scores / cap)."""
    moe: MoEArgs | None = None
    """The sparse MLPs of a mixture-of-experts family; None for dense ones."""

    @property
    def kv_window(self) -> int | None:
        """The window every layer attends within, or None: where it is set, the KV blocks of positions out of the
        window are never read again and go back to the pool (see :class:`~chatloop.engine.policy.SchedulerPolicy`)."""
        if self.sliding_window is None or (self.layer_types is not None and "full_attention" in self.layer_types):
            return None
        return self.sliding_window

    @property
    def mixed_window(self) -> int | None:
        """The window of the windowed layers of a model that has full-attention layers too (Gemma 2/3, Qwen2/Qwen3
        below ``max_window_layers``), or None: their KV blocks live in a pool of their own, indexed by a second
        block table per sequence that slides with the window (see :class:`~chatloop.models.kv_cache.PagedKVCache`)."""
        if self.sliding_window is None or self.layer_types is None:
            return None
        if "sliding_attention" not in self.layer_types or "full_attention" not in self.layer_types:
            return None
        return self.sliding_window

    @property
    def rope_switch(self) -> int | None:
        """Phi-3's longrope: the length past which the long factors rotate every position, or None. A sequence that
        grows past it as it decodes is computed again from its first token (as transformers' ``generate`` does: its
        cache holds positions rotated with the short factors), see :class:`~chatloop.engine.policy.SchedulerPolicy`."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) != "longrope":
            return None
        return scaling["original_max_position_embeddings"]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read a ``config.json`` dict; raise ``ValueError`` for families or features not supported."""
        family = config.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model_type {family!r} is not supported: ChatLoop runs {', '.join(SUPPORTED_FAMILIES)} checkpoints"
            )
        if family in MOE_FAMILIES:  # the attention of Llama (Qwen3-MoE, plus its q/k norms) or Mistral (Mixtral)
            from .moe import moe_args

            if config.get("use_sliding_window") or (family == "mixtral" and _window(config)):
                raise ValueError(
                    f"{family} with a sliding attention window is not supported: set sliding_window to null "
                    "in config.json only if your prompts stay within the window"
                )

            dense = cls.from_hf_config({**config, "model_type": "mistral" if family == "mixtral" else "llama"})
            qk_norm = "head" if family == "qwen3_moe" else None
            return replace(dense, family=family, moe=moe_args(config), qk_norm=qk_norm)
        if family == "gpt2":
            hidden = config["n_embd"]
            return cls(
                family=family,
                vocab_size=config["vocab_size"],
                hidden_size=hidden,
                num_layers=config["n_layer"],
                num_heads=config["n_head"],
                num_kv_heads=config["n_head"],
                head_dim=hidden // config["n_head"],
                intermediate_size=config.get("n_inner") or 4 * hidden,
                norm_eps=config.get("layer_norm_epsilon", 1e-5),
                max_position_embeddings=config["n_positions"],
                tie_word_embeddings=config.get("tie_word_embeddings", True),
            )
        windows = _llama_windows(config) if family in ("mistral", "qwen2", "qwen3") else {}
        if family in ("gemma2", "gemma3_text"):
            config, gemma_options = _gemma(config)
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if family == "phi3" and rope_type in ("su", "yarn"):  # older Phi-3 128k configs' name for it (transformers')
            rope_type = rope["rope_type"] = "longrope"
        rope_types = ("default", "linear", "llama3", *(("longrope",) if family == "phi3" else ()))
        if rope_type not in rope_types:
            raise ValueError(f"rope_type {rope_type!r} is not supported for {family}: use a model with "
                             f"{', '.join(rope_types)} RoPE")
        partial_rotary = float(rope.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        if partial_rotary != 1.0 and family != "phi3":
            raise ValueError(f"partial_rotary_factor {partial_rotary} is not supported for {family}: ChatLoop turns "
                             "part of each head for phi3 only")
        num_heads = config["num_attention_heads"]
        family_options: dict[str, Any] = {}
        if family == "qwen3":
            family_options["qk_norm"] = "head"
        if family == "olmo2":
            family_options["qk_norm"] = "projection"
        if family in ("gemma2", "gemma3_text"):
            family_options.update(gemma_options)
        family_options.update(windows)
        if family == "phi3":
            family_options.update(partial_rotary_factor=partial_rotary, sliding_window=_window(config))
            if rope_type == "longrope":
                rope.setdefault("original_max_position_embeddings", config.get("original_max_position_embeddings"))
                rope.setdefault("max_position_embeddings", config.get("max_position_embeddings"))
                missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings")
                           if rope.get(k) is None]
                if missing:
                    raise ValueError(f"longrope RoPE needs {', '.join(missing)} in config.json's rope_scaling")
        if family == "granite":
            family_options.update(
                attention_scale=float(config.get("attention_multiplier", 1.0)),
                embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(config.get("residual_multiplier", 1.0)),
                logits_scaling=float(config.get("logits_scaling", 1.0)),
            )
        return cls(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", family == "qwen2"),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope_theta=float(rope_theta),
            rope_scaling=rope if rope_type != "default" else None,
            **family_options,
        )


def _window(config: dict[str, Any]) -> int | None:
    """A sliding window that can matter (one that spans max_position_embeddings never does), or None."""
    window = config.get("sliding_window")
    if window is None or window >= config.get("max_position_embeddings", 2048):
        return None
    if window < 1:
        raise ValueError(f"sliding_window {window} must be at least 1, or null for none")
    return int(window)


def _llama_windows(config: dict[str, Any]) -> dict[str, Any]:
    """Mistral's window (every layer), or Qwen2's and Qwen3's (``use_sliding_window``: the layers from
    ``max_window_layers`` on, or those ``layer_types`` names): transformers' rules. {} where none matters."""
    family = config["model_type"]
    if family != "mistral" and not config.get("use_sliding_window"):
        return {}  # (transformers sets sliding_window to None: no layer is windowed, whatever layer_types says)
    window = _window(config)
    if window is None:
        return {}
    if family == "mistral":  # transformers' Mistral windows every layer, layer_types or not
        return {"sliding_window": window}
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types is None:
        first = config.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must give sliding_attention or full_attention for each of the {num_layers} "
                         f"layers, got {layer_types}")
    if "sliding_attention" not in layer_types:
        return {}
    return {"sliding_window": window,
            "layer_types": None if "full_attention" not in layer_types else tuple(layer_types)}


def _gemma(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gemma 2's or 3's config with the full-attention layers' RoPE where Llama's is read, and Gemma's options."""
    family = config["model_type"]
    if config.get("use_bidirectional_attention"):
        raise ValueError(f"{family} with use_bidirectional_attention is not supported: ChatLoop runs causal models")
    activation = config.get("hidden_activation") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"{family} hidden_activation {activation!r} is not supported: use gelu_pytorch_tanh")
    num_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types is None:
        pattern = config.get("sliding_window_pattern", 6 if family == "gemma3_text" else 2)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must give sliding_attention or full_attention for each of the {num_layers} "
                         f"layers, got {layer_types}")
    parameters = config.get("rope_parameters") or {}
    if "full_attention" in parameters:  # transformers 5: one RoPE per layer type
        full, local = dict(parameters["full_attention"]), dict(parameters.get("sliding_attention") or {})
    else:
        full = dict(config.get("rope_scaling") or parameters)
        full.setdefault("rope_theta", config.get("rope_theta", 1000000.0 if family == "gemma3_text" else 10000.0))
        local = {"rope_theta": config.get("rope_local_base_freq", 10000.0) if family == "gemma3_text"
                 else full["rope_theta"]}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{family} sliding-window layers with rope_type {local.get('rope_type')!r} are not "
                         "supported: ChatLoop runs them with default RoPE")
    window = config.get("sliding_window")
    options = {
        "qk_norm": "head" if family == "gemma3_text" else None,
        "attn_logit_softcapping": config.get("attn_logit_softcapping"),
        "attention_scale": float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        "layer_types": tuple(layer_types),
        "sliding_window": None if window is None else int(window),
        "local_rope_theta": float(local.get("rope_theta", 10000.0)),
        "final_logit_softcapping": config.get("final_logit_softcapping"),
    }
    return {**config, "rope_parameters": full, "rope_scaling": None, "tie_word_embeddings":
            config.get("tie_word_embeddings", True)}, options
