"""Loading one stage: only its own partition, checked against the manifest (its bytes hashed as it loads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..kernels import load_kernels
from ..models import LayerRange, ModelArgs, StageModel, build_stage, family_of
from ..models.fused_decode import LlamaDecodeKernel
from ..models.llama import LlamaStage, fuse_projections, use_row_kernels
from ..models.moe import MoEStage
from ..models.packing import concat_linear, pack_linear_weights
from ..quant.modules import interleave_for_kernel, quantize_modules, tie_quantized_head
from .integrity import start_check
from .manifest import QUANTIZED_KEY, Manifest, ManifestError, PartitionInfo
from .safetensors_stream import SafetensorsError, read_header

__all__ = ["PartitionError", "load_stage"]


class PartitionError(ValueError):
    """A partition file that is missing, damaged, or not the one the manifest describes."""


@contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip ``reset_parameters``' random init: the weights come from the file, and initialising
    meta tensors goes through torch's reference kernels, which import torch._dynamo (seconds per worker)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "zeros_", "ones_", "trunc_normal_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def load_stage(
    directory: str | Path,
    index: int,
    *,
    expected_layers: LayerRange | None = None,
    expected_file: str | None = None,
    dtype: torch.dtype | None = None,
    verify_sha256: bool = True,
    manifest: Manifest | None = None,
    pack_weights: bool = False,
    native_kernels: bool = True,
) -> StageModel:
    """Build stage ``index`` from ``directory/partition_{index}.safetensors``.

    Checks, before any weight is read: the partition is the file ``expected_file`` names (if
    given) and exists, its size matches the manifest, its layers match ``expected_layers``, its
    tensors are exactly the stage's, in the manifest's dtype. With ``verify_sha256`` its bytes are
    hashed, at every load, against the manifest's hash (BLAKE3 where the manifest has it, else
    sha256: see :mod:`~chatloop.partition.integrity`) on a thread of their own while the weights
    load; a stage is returned only once its bytes were found to be the manifest's. ``dtype`` casts the weights
    after loading (the stage then computes in it). ``pack_weights`` then prepares float32
    linear layers for small matmuls, on the native kernel if ``native_kernels``
    (:func:`~chatloop.models.packing.pack_linear_weights`) and merges a Llama layer's q/k/v and gate/up
    projections (:func:`~chatloop.models.llama.fuse_projections`); ``native_kernels`` also runs float32
    decode attention on ChatLoop's kernel and, where every layer can, whole decode steps
    (:mod:`~chatloop.models.fused_decode`).
    """
    directory = Path(directory)
    manifest = manifest or Manifest.load(directory)
    if not 0 <= index < manifest.num_partitions:
        raise ManifestError(
            f"{directory} holds {manifest.num_partitions} partitions, partition {index} was asked for: "
            f"split the model into as many partitions as there are workers"
        )
    info = manifest.partitions[index]
    why = manifest.mismatch(index, "the configuration", directory, file=expected_file)
    if why is not None:
        raise PartitionError(f"{why}: set cluster.workers[{index}].partition to {info.file} (or leave it empty)")
    path = partition_file(directory, info)
    why = manifest.mismatch(index, "the configuration", directory, layers=expected_layers)
    if why is not None:
        raise PartitionError(f"{why}: make the cluster's layer ranges match the split")
    verdict = start_check(path, info.hashes) if verify_sha256 else None
    try:
        stage = _build(path, index, manifest, dtype, pack_weights, native_kernels)
    except Exception:
        _raise_if_corrupt(path, verdict)  # a load that failed on damaged bytes: the hash says so best
        raise
    _raise_if_corrupt(path, verdict)
    return stage


def partition_file(directory: Path, info: PartitionInfo) -> Path:
    """The path of partition ``info`` in ``directory``; raise :class:`PartitionError` if it is missing or its size is
    not the manifest's (truncated, or from another split)."""
    path = directory / info.file
    if not path.is_file():
        raise PartitionError(f"{path} is missing: copy it from the splitter's output, or split the model again")
    size = path.stat().st_size
    if size != info.num_bytes:
        raise PartitionError(f"{path} has {size} bytes, the manifest says {info.num_bytes}: "
                             "the file is truncated or from another split")
    return path


def _raise_if_corrupt(path: Path, verdict: Future | None) -> None:
    """Wait for the hash of ``path`` (if it was started); raise :class:`PartitionError` unless it matched."""
    if verdict is None:
        return
    try:
        mismatch = verdict.result()
    except OSError as e:
        raise PartitionError(f"{path} cannot be read to check its hash ({e}): copy it again") from None
    except ValueError as e:  # the manifest records no hash this installation computes
        raise PartitionError(f"{path}: {e}") from None
    if mismatch is not None:
        raise PartitionError(mismatch.message)


def _build(
    path: Path, index: int, manifest: Manifest, dtype: torch.dtype | None, pack_weights: bool, native_kernels: bool,
) -> StageModel:
    """The stage of ``path`` (whose size and layers were checked), with the transformations ``load_stage`` asks."""
    info = manifest.partitions[index]
    args = ModelArgs.from_hf_config(manifest.model_config)
    is_last = index == manifest.num_partitions - 1
    with torch.device("meta"), _no_weight_init():
        stage = build_stage(args, info.layers, is_first=index == 0, is_last=is_last)
    expected = set(stage.state_dict())
    try:
        header = read_header(path)
    except SafetensorsError as e:
        raise PartitionError(str(e)) from None
    ignored = family_of(args).ignored_suffixes
    present = {k for k in header if not k.endswith(ignored)}
    if args.tie_word_embeddings:
        present.discard("lm_head.weight")  # some checkpoints store the tied head too
    if present != expected:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise PartitionError(
            f"{path} does not hold stage {index}'s tensors: missing {missing[:5]}, unexpected {extra[:5]}")
    wrong = [k for k in expected
             if header[k].dtype.is_floating_point and str(header[k].dtype) != f"torch.{manifest.dtype}"]
    if wrong:
        raise PartitionError(
            f"{path}: tensor {wrong[0]} is {header[wrong[0]].dtype}, the manifest says {manifest.dtype}")

    try:
        with safe_open(path, framework="pt") as f:
            formats = json.loads((f.metadata() or {}).get(QUANTIZED_KEY, "{}"))
            state = {k: f.get_tensor(k) for k in expected}
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise PartitionError(f"{path} cannot be read ({e}): split the model again") from None
    return finish_stage(stage, state, formats, str(path), dtype, pack_weights, native_kernels)


def finish_stage(
    stage: StageModel, state: dict[str, torch.Tensor], formats: dict[str, str], source: str,
    dtype: torch.dtype | None, pack_weights: bool, native_kernels: bool,
) -> StageModel:
    """Give the meta-device ``stage`` its weights ``state`` (read from ``source``, quantized as ``formats`` say) and
    the transformations :func:`load_stage` describes. Shared by every way of reading a stage's tensors."""
    try:
        quantize_modules(stage, formats, state)
    except ValueError as e:
        raise PartitionError(f"{source}: {e}: split the model again") from None
    stage.load_state_dict(state, assign=True, strict=True)
    del state  # the stage holds the only reference: packing can free each plain weight
    tie_quantized_head(stage)
    if dtype is not None:
        stage.to(dtype)
    stage.eval().requires_grad_(False)
    stage.native_attention = native_kernels and load_kernels() is not None
    if pack_weights:
        pack_linear_weights(stage, use_kernel=native_kernels)
    fuse = pack_weights and isinstance(stage, LlamaStage) and next(stage.parameters()).dtype == torch.float32
    if fuse:
        fuse_projections(stage, concat_linear)  # float32 only: bfloat16 stays bit-equal to transformers
    _own_memory(stage)
    if native_kernels:
        interleave_for_kernel(stage)
        large_matrices_on_huge_pages(stage)  # after the last re-layout, before the fused step points at them
    if fuse and stage.native_attention:
        use_row_kernels(stage)
        stage.decode_kernel = LlamaDecodeKernel.for_stage(stage)  # points at the weights: after they moved
    elif isinstance(stage, MoEStage) and stage.native_attention \
            and next(stage.parameters()).dtype == torch.float32:  # (its quantized experts: whether packed or not)
        use_row_kernels(stage)  # the modules' norms and rotary on the one call's row kernels: the same roundings
        stage.decode_kernel = LlamaDecodeKernel.for_stage(stage)
    return stage


HUGE_PAGE_MATRIX_BYTES = 32 << 20
"""A quantized matrix of this many bytes or more gets 2 MiB pages of its own (:func:`large_matrices_on_huge_pages`):
a head's, which every decode step streams whole."""


def large_matrices_on_huge_pages(stage: StageModel) -> None:
    """Move each quantized matrix of :data:`HUGE_PAGE_MATRIX_BYTES` or more (a head: 175 MB in Qwen3-30B-A3B's Q4_K)
    onto transparent huge pages (:func:`~chatloop.kernels.experts.move_to_huge_pages`), unless another module
    shares it (a tied embedding). The kernels stream it faster from 2 MiB pages: Qwen3-30B-A3B's last 3 layers with
    the head, one thread, caches flushed before each step as between a worker's steps, 25.8-26.4 against 28.9-29.5
    ms (docs/performance.md). Smaller matrices (5 MB attention projections) gained nothing measurable, and a block
    of their own would round each up to 2 MiB."""
    from ..kernels.experts import move_to_huge_pages
    from ..quant import QuantLinear

    holders: dict[int, int] = {}  # modules holding each tensor: stage.parameters() would count a shared one once
    for module in stage.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            holders[tensor.data_ptr()] = holders.get(tensor.data_ptr(), 0) + 1
    for module in stage.modules():
        if isinstance(module, QuantLinear) and module.weight.device.type == "cpu" \
                and module.weight.nbytes >= HUGE_PAGE_MATRIX_BYTES and holders[module.weight.data_ptr()] == 1:
            move_to_huge_pages([module])


def _own_memory(stage: StageModel) -> None:
    """Give every weight still in the file's mapping memory of its own, one at a time. Mapped weights keep every
    page read resident, and those that packing or fusing replaced stay mapped as long as any other weight does:
    a 7B int4 worker held ~400 MB more than its partition that way."""
    copies: dict[int, torch.Tensor] = {}  # a tensor two modules share (a tied head) stays shared

    def own(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in copies:
            copy = tensor.clone()
            copies[tensor.data_ptr()] = copies[copy.data_ptr()] = copy  # met again, it is already its own
        return copies[tensor.data_ptr()]

    with torch.no_grad():
        for module in stage.modules():
            for parameter in module.parameters(recurse=False):
                parameter.data = own(parameter.data)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    setattr(module, name, own(buffer))
