"""``manifest.json``: what the splitter wrote, so that each worker can check its partition."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..models import LayerRange

__all__ = ["Manifest", "PartitionInfo", "ManifestError", "MANIFEST_NAME", "FORMAT_VERSION", "QUANTIZED_KEY"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
QUANTIZED_KEY = "chatloop.quantized"
"""A partition's safetensors metadata entry: JSON {tensor name: format} of its quantized tensors."""


class ManifestError(ValueError):
    """A missing or unreadable manifest, or a partition that does not match it."""


@dataclass(frozen=True)
class PartitionInfo:
    """One ``partition_N.safetensors``: its layers, its ends, its bytes and their hashes."""

    index: int
    file: str
    start_layer: int  # inclusive, as in the reference deployment's worker configs
    end_layer: int  # inclusive
    has_embeddings: bool
    has_head: bool
    num_bytes: int
    sha256: str
    num_tensors: int
    blake3: str | None = None
    """The file's BLAKE3 (hex), checked instead of the slower sha256 where present; None in splits made before."""

    @property
    def layers(self) -> LayerRange:
        return LayerRange(self.start_layer, self.end_layer)

    @property
    def hashes(self) -> dict[str, str]:
        """Every hash the manifest records for the file: algorithm -> hex digest."""
        return {name: value for name, value in (("blake3", self.blake3), ("sha256", self.sha256)) if value}


@dataclass(frozen=True)
class Manifest:
    """The model's config, the dtype, and one entry per partition."""

    model_config: dict[str, Any]
    dtype: str
    partitions: list[PartitionInfo]
    tokenizer_files: list[str] = field(default_factory=list)
    source: str = ""
    format_version: int = FORMAT_VERSION
    quantization: str | None = None
    """The scheme the linear weights were stored with (int8, int4, gguf); None: all floating, in ``dtype``."""

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)

    @property
    def plan(self) -> list[LayerRange]:
        return [p.layers for p in self.partitions]

    def mismatch(self, index: int, given_by: str, directory: str | Path, *, file: str | None = None,
                 layers: LayerRange | None = None) -> str | None:
        """Why ``given_by`` (the configuration, a worker's file) does not give worker ``index`` this manifest's
        partition (its ``file``, its ``layers``; None: not given), or None when it does. The one check of an
        assignment against a split (in ``directory``): the coordinator runs it on its configuration, the loader
        on its spec, a worker on its own file."""
        if not 0 <= index < self.num_partitions:
            return f"{given_by} gives worker {index} a partition, but {directory} holds {self.num_partitions}"
        info = self.partitions[index]
        if file and file != info.file:
            return (f"{given_by} gives worker {index} partition {file}, but partition {index} in {directory} is "
                    f"{info.file}")
        if layers is not None and (layers.start, layers.end) != (info.start_layer, info.end_layer):
            return (f"{given_by} gives worker {index} layers {layers}, but {info.file} in {directory} holds layers "
                    f"{info.layers} (the split's plan: {', '.join(str(r) for r in self.plan)})")
        return None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Read ``DIR/manifest.json``; raise ``ManifestError`` saying what is wrong."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {directory}: "
                                f"split the model there first with chatloop-split --output {directory}")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise ManifestError(
                    f"{path} has format_version {raw.get('format_version')}, this ChatLoop reads {FORMAT_VERSION}: "
                    "split the model again"
                )
            partitions = [PartitionInfo(**p) for p in raw.pop("partitions")]
            manifest = cls(partitions=partitions, **raw)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise ManifestError(f"{path} is not a ChatLoop manifest ({e}): split the model again") from None
        if [p.index for p in partitions] != list(range(len(partitions))):
            raise ManifestError(f"{path}: partitions must be numbered 0..{len(partitions) - 1} in order")
        return manifest
