"""What each layer of a split model asks of a host (:class:`~chatloop.partition.placement.ModelCosts`), from its
manifest alone: the coordinator plans without the partition files."""

from __future__ import annotations

import math

import torch

from ..models import LayerRange, ModelArgs, build_stage
from .loader import _no_weight_init
from .manifest import Manifest
from .placement import ModelCosts

__all__ = ["model_costs", "HEADROOM_MB"]

HEADROOM_MB = 256
"""What a worker takes beyond its weights and KV pool: torch and its threads, activations of a prefill chunk."""


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.finfo(dtype).bits // 8
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in module.state_dict().values())


def model_costs(manifest: Manifest, *, kv_cache_mb: float, num_hosts: int,
                headroom_mb: float = HEADROOM_MB) -> ModelCosts:
    """The costs of the model ``manifest`` describes. Layer, embedding and head bytes come from the model's shapes
    in the manifest's dtype, scaled so that they add up to the partitions' bytes (a quantized split is smaller).

    The KV pool grows with the layers a stage holds: ``kv_cache_mb`` is what a stage of an even split over
    ``num_hosts`` gets, so a plan keeps the even split's capacity in tokens (the smallest stage's sets it).
    """
    args = ModelArgs.from_hf_config(manifest.model_config)
    dtype = getattr(torch, manifest.dtype)
    n = manifest.partitions[-1].end_layer + 1
    with torch.device("meta"), _no_weight_init():
        layers = [_bytes(build_stage(args, LayerRange(i, i), is_first=False, is_last=False), dtype) for i in range(n)]
        first = _bytes(build_stage(args, LayerRange(0, 0), is_first=True, is_last=False), dtype) - layers[0]
        last = _bytes(build_stage(args, LayerRange(n - 1, n - 1), is_first=False, is_last=True), dtype) - layers[-1]
    shapes_total = sum(layers) + first + last
    files_total = sum(p.num_bytes for p in manifest.partitions)
    scale = files_total / shapes_total if shapes_total else 1.0
    layer_bytes = [round(b * scale) for b in layers]
    mean = sum(layer_bytes) / n
    return ModelCosts(
        layer_bytes=layer_bytes,
        kv_bytes_per_layer=int(kv_cache_mb * 2**20 / math.ceil(n / max(1, num_hosts))),
        embed_bytes=round(first * scale), head_bytes=round(last * scale),
        head_layers=last * scale / mean if mean else 0.0,
        headroom_bytes=int(headroom_mb * 2**20),
    )
