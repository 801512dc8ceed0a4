"""Model families and the one question the splitter asks of them: which stage owns a tensor."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .args import ModelArgs
from .batch import StepBatch
from .gemma3 import Gemma2Stage, Gemma3Stage
from .gpt2 import GPT2Stage
from .granite import GraniteStage
from .kv_cache import PagedKVCache
from .layer_range import LayerRange
from .llama import LlamaStage
from .mixtral import MixtralStage
from .olmo2 import Olmo2Stage
from .phi3 import Phi3Stage
from .qwen3 import Qwen3Stage
from .qwen3_moe import Qwen3MoeStage
from .stage_model import StageModel

__all__ = ["Family", "LayerRange", "ModelArgs", "PagedKVCache", "StageModel", "StepBatch", "build_stage", "family_of"]


@dataclass(frozen=True)
class Family:
    """How one architecture names its tensors in a Hugging Face checkpoint."""

    stage_class: type[StageModel]
    layer_pattern: re.Pattern[str]  # group 1 is the global layer index
    first_prefixes: tuple[str, ...]  # embeddings: owned by the first stage
    last_prefixes: tuple[str, ...]  # final norm and head: owned by the last stage
    tied_key: str  # the embedding that a tied head reads on the last stage
    ignored_suffixes: tuple[str, ...] = ()  # buffers some checkpoints carry that the stage recomputes
    module_prefix: str = ""  # the base model's name, which some checkpoints leave off their keys

    def canonical(self, key: str) -> str:
        """The key as ``save_pretrained`` names it (GPT-2 hub files say ``h.0.attn...`` for
        ``transformer.h.0.attn...``)."""
        if self.module_prefix and not key.startswith((self.module_prefix, "lm_head.")):
            return self.module_prefix + key
        return key

    def stages_of(self, key: str, plan: list[LayerRange], tied: bool) -> list[int]:
        """The stages whose partition holds ``key``; raises ``ValueError`` for a tensor no stage can own."""
        match = self.layer_pattern.match(key)
        if match:
            layer = int(match.group(1))
            for i, layer_range in enumerate(plan):
                if layer in layer_range.indices:
                    return [i]
            raise ValueError(
                f"tensor {key} belongs to layer {layer}, which no stage owns (plan ends at {plan[-1].end})")
        last = len(plan) - 1
        if key == self.tied_key and tied:
            return sorted({0, last})
        if key.startswith(self.first_prefixes):
            return [0]
        if key.startswith(self.last_prefixes):
            return [last]
        raise ValueError(f"tensor {key} is neither a layer, an embedding nor the head: "
                         "is this checkpoint of the family it claims?")


_LLAMA = Family(
    LlamaStage,
    re.compile(r"model\.layers\.(\d+)\."),
    ("model.embed_tokens.",),
    ("model.norm.", "lm_head."),
    "model.embed_tokens.weight",
    (".rotary_emb.inv_freq",),
)
_GPT2 = Family(
    GPT2Stage,
    re.compile(r"transformer\.h\.(\d+)\."),
    ("transformer.wte.", "transformer.wpe."),
    ("transformer.ln_f.", "lm_head."),
    "transformer.wte.weight",
    (".attn.bias", ".attn.masked_bias"),
    "transformer.",
)
_FAMILIES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}
_FAMILIES.update({  # mixture-of-experts families: Llama's tensor names plus their routers and experts
    family: Family(stage, _LLAMA.layer_pattern, _LLAMA.first_prefixes, _LLAMA.last_prefixes, _LLAMA.tied_key,
                   _LLAMA.ignored_suffixes)
    for family, stage in (("qwen3_moe", Qwen3MoeStage), ("mixtral", MixtralStage))
})
_FAMILIES["qwen3"] = dataclasses.replace(_LLAMA, stage_class=Qwen3Stage)  # Llama's tensor names, its own layer
_FAMILIES["granite"] = dataclasses.replace(_LLAMA, stage_class=GraniteStage)
_FAMILIES["olmo2"] = dataclasses.replace(_LLAMA, stage_class=Olmo2Stage)
_FAMILIES["phi3"] = dataclasses.replace(_LLAMA, stage_class=Phi3Stage)
_FAMILIES["gemma3_text"] = dataclasses.replace(_LLAMA, stage_class=Gemma3Stage)
_FAMILIES["gemma2"] = dataclasses.replace(_LLAMA, stage_class=Gemma2Stage)


def family_of(args: ModelArgs) -> Family:
    return _FAMILIES[args.family]


def build_stage(config: dict[str, Any] | ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> StageModel:
    """An uninitialised stage for ``layers`` of the model described by a ``config.json`` dict."""
    args = config if isinstance(config, ModelArgs) else ModelArgs.from_hf_config(config)
    return family_of(args).stage_class(args, layers, is_first, is_last)
