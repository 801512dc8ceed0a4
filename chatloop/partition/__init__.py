"""Partitions: the plan (layers to stages), the streaming splitter, the manifest, loading one stage."""

from .loader import PartitionError, load_stage
from .manifest import Manifest, ManifestError, PartitionInfo
from .plan import PlanError, parse_ranges, plan_layers
from .safetensors_stream import SafetensorsError
from .splitter import split_model

__all__ = [
    "Manifest", "ManifestError", "PartitionError", "PartitionInfo", "PlanError",
    "SafetensorsError", "load_stage", "parse_ranges", "plan_layers", "split_model",
]
