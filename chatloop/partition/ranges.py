"""Loading any contiguous range of layers from the partition files a host holds, without a new split.

Layers keep their global names in every partition (``model.layers.17.*``), so the tensors of layers 5-13 are a
subset of the keys of the partitions that cover them: a stage for another range than the split's reads each of
those files (checked against the manifest: size, hash, dtype) and takes only its own keys. A plan computed from the
hosts' speeds (:mod:`chatloop.partition.placement`) can then give a host any range its files cover.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..models import LayerRange, ModelArgs, StageModel, build_stage
from .integrity import start_check
from .loader import PartitionError, _no_weight_init, _raise_if_corrupt, finish_stage, partition_file
from .manifest import QUANTIZED_KEY, Manifest, PartitionInfo
from .safetensors_stream import SafetensorsError, read_header

__all__ = ["files_for_range", "loadable_spans", "load_layer_range", "missing_files", "num_layers_of"]


def num_layers_of(manifest: Manifest) -> int:
    """The model's decoder layers: the last partition ends at the last one."""
    return manifest.partitions[-1].end_layer + 1


def files_for_range(manifest: Manifest, layers: LayerRange) -> list[PartitionInfo]:
    """The partitions that hold some of ``layers`` (in order). They also hold the embeddings (partition 0, which
    holds layer 0) and the head (the last, which holds the last layer) whenever the range needs them."""
    total = num_layers_of(manifest)
    if layers.end >= total:
        raise PartitionError(f"layers {layers} run past the model's last layer {total - 1}: give a range within "
                             f"0-{total - 1}")
    return [p for p in manifest.partitions if p.start_layer <= layers.end and p.end_layer >= layers.start]


def missing_files(manifest: Manifest, layers: LayerRange, held: Iterable[str]) -> list[str]:
    """The partition files ``layers`` needs that are not among ``held``."""
    held = set(held)
    return [p.file for p in files_for_range(manifest, layers) if p.file not in held]


def loadable_spans(manifest: Manifest, held: Iterable[str]) -> list[LayerRange]:
    """The widest ranges a host holding the files ``held`` can load: runs of consecutive partitions, merged.
    Any contiguous range within one of them can be loaded."""
    held = set(held)
    spans: list[LayerRange] = []
    for p in manifest.partitions:
        if p.file not in held:
            continue
        if spans and spans[-1].end + 1 == p.start_layer:
            spans[-1] = LayerRange(spans[-1].start, p.end_layer)
        else:
            spans.append(p.layers)
    return spans


def held_in(directory: Path, manifest: Manifest) -> list[str]:
    """The manifest's partition files present in ``directory`` (by name; size and hash are checked at load)."""
    return [p.file for p in manifest.partitions if (directory / p.file).is_file()]


def load_layer_range(
    directory: str | Path,
    layers: LayerRange,
    *,
    held: Iterable[str] | None = None,
    manifest: Manifest | None = None,
    dtype: torch.dtype | None = None,
    verify_sha256: bool = True,
    pack_weights: bool = False,
    native_kernels: bool = True,
) -> StageModel:
    """A stage for ``layers`` (any contiguous range; the first stage if it starts at layer 0, the last if it ends at
    the model's last layer) read from the partitions in ``directory`` that cover it.

    ``held``: the partition files this host holds (its worker config's ``holds``); None: those present in
    ``directory``. A range that needs a file not held is refused naming the missing files. Every file read is
    checked as :func:`~chatloop.partition.loader.load_stage` checks its one file: size, tensors, dtype, and (with
    ``verify_sha256``) its hash. The other arguments are ``load_stage``'s.
    """
    directory = Path(directory)
    manifest = manifest or Manifest.load(directory)
    total = num_layers_of(manifest)
    needed = files_for_range(manifest, layers)
    held = list(held) if held is not None else held_in(directory, manifest)
    missing = missing_files(manifest, layers, held)
    if missing:
        spans = ", ".join(str(s) for s in loadable_spans(manifest, held)) or "none"
        raise PartitionError(
            f"cannot load layers {layers} in {directory}: it needs {', '.join(missing)}, which this host does not "
            f"hold (the ranges its files cover: {spans}): copy those files there and list them in the worker "
            f"config's holds, or give this host a range within what it holds")
    paths = [partition_file(directory, info) for info in needed]
    verdicts = [start_check(path, info.hashes) if verify_sha256 else None for path, info in zip(paths, needed)]
    try:
        stage = _build_range(paths, layers, layers.start == 0, layers.end == total - 1, manifest, dtype,
                             pack_weights, native_kernels)
    except Exception:
        for path, verdict in zip(paths, verdicts):
            _raise_if_corrupt(path, verdict)
        raise
    for path, verdict in zip(paths, verdicts):
        _raise_if_corrupt(path, verdict)
    return stage


def _build_range(
    paths: list[Path], layers: LayerRange, is_first: bool, is_last: bool, manifest: Manifest,
    dtype: torch.dtype | None, pack_weights: bool, native_kernels: bool,
) -> StageModel:
    args = ModelArgs.from_hf_config(manifest.model_config)
    with torch.device("meta"), _no_weight_init():
        stage = build_stage(args, layers, is_first=is_first, is_last=is_last)
    expected = set(stage.state_dict())
    where: dict[str, Path] = {}  # each tensor from the first file holding it (a tied embedding is in two)
    headers = {}
    for path in paths:
        try:
            headers[path] = header = read_header(path)
        except SafetensorsError as e:
            raise PartitionError(str(e)) from None
        for key in expected.intersection(header):
            where.setdefault(key, path)
    missing = sorted(expected - set(where))
    if missing:
        raise PartitionError(f"{', '.join(p.name for p in paths)} do not hold the tensors of layers {layers}: "
                             f"missing {missing[:5]}: split the model again")
    wrong = [k for k, path in where.items() if headers[path][k].dtype.is_floating_point
             and str(headers[path][k].dtype) != f"torch.{manifest.dtype}"]
    if wrong:
        raise PartitionError(f"{where[wrong[0]]}: tensor {wrong[0]} is {headers[where[wrong[0]]][wrong[0]].dtype}, "
                             f"the manifest says {manifest.dtype}")
    state: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    for path in paths:
        keys = [k for k, p in where.items() if p == path]
        try:
            with safe_open(path, framework="pt") as f:
                own = json.loads((f.metadata() or {}).get(QUANTIZED_KEY, "{}"))
                state.update({k: f.get_tensor(k) for k in keys})
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise PartitionError(f"{path} cannot be read ({e}): split the model again") from None
        formats.update({k: v for k, v in own.items() if k in keys})
    source = "+".join(p.name for p in paths)
    return finish_stage(stage, state, formats, source, dtype, pack_weights, native_kernels)
