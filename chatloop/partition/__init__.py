"""Partitions: the plan (layers to stages), the streaming splitter, the manifest, loading one stage."""

from .manifest import Manifest, ManifestError, PartitionInfo
from .plan import LayerRange, PlanError, parse_ranges, plan_layers
from .safetensors_stream import SafetensorsError

__all__ = [
    "LayerRange", "Manifest", "ManifestError", "PartitionError", "PartitionInfo", "PlanError",
    "SafetensorsError", "load_stage", "parse_ranges", "plan_layers", "split_model",
]


def __getattr__(name: str):
    # The loader and the splitter import the model code, which imports the plan from here:
    # resolving them on first use keeps that import order acyclic.
    if name in ("load_stage", "PartitionError"):
        from . import loader

        return getattr(loader, name)
    if name == "split_model":
        from .splitter import split_model

        return split_model
    raise AttributeError(name)
