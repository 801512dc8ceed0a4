"""The streaming splitter: a key filter plus a plan.

Every tensor of the source checkpoint goes to the partition(s) of the stage that owns it,
read and written one at a time, so peak memory stays near the largest tensor. With ``quantize``
the linear weights are quantized on the way (:mod:`chatloop.quant`); a GGUF file's quantized
tensors are copied as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..embedded import copy_tokenizer, resolve_model
from ..models import Family, LayerRange, ModelArgs, family_of
from ..models.moe import check_expert_layout
from ..quant import q4_0_as_q4_1, row_bytes
from ..quant import quantize as quantize_matrix
from ..quant.scheme import SCHEMES, format_for
from .gguf_source import gguf_path, open_gguf
from .manifest import QUANTIZED_KEY, Manifest, PartitionInfo
from .plan import parse_ranges, plan_layers
from .safetensors_stream import StreamingWriter, read_header, read_tensor

__all__ = ["split_model", "main", "CheckpointSource"]

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


QUANTIZE_ROWS = 4096
"""Rows of a matrix quantized at once: the float32 working copies stay small."""
OLD_STAMP_SUFFIX = ".verified"
"""Earlier ChatLoops wrote a stamp (inode, size, mtime) beside each partition and trusted it instead of hashing the
file again; a split removes those it finds: a stamp says nothing of the bytes (``touch -r`` restores an mtime)."""


@dataclass(frozen=True)
class CheckpointSource:
    """The tensors of a checkpoint folder, each readable on its own."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    sizes: dict[str, int]
    read: Callable[[str], torch.Tensor]
    formats: dict[str, str] = field(default_factory=dict)
    """Tensors stored quantized in the source (a GGUF file): name -> format; ``read`` gives their bytes."""

    @classmethod
    def open(cls, folder: Path) -> CheckpointSource:
        """Open safetensors (one file or sharded with an index) or, failing that, a ``pytorch_model.bin``."""
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if files:
            infos = {}
            for name in files:
                if not (folder / name).is_file():
                    raise FileNotFoundError(
                        f"{folder / name} is listed in {index.name} but missing: download the checkpoint again")
                infos.update(read_header(folder / name))
            return cls(
                list(infos),
                {k: i.shape for k, i in infos.items()},
                {k: i.dtype for k, i in infos.items()},
                {k: i.num_bytes for k, i in infos.items()},
                lambda key: read_tensor(infos[key]),
            )
        bin_file = folder / "pytorch_model.bin"
        if bin_file.is_file():
            # mmap keeps the whole file out of anonymous memory; only safetensors is truly streamed.
            state = torch.load(bin_file, map_location="cpu", mmap=True, weights_only=True)
            return cls(
                list(state),
                {k: tuple(v.shape) for k, v in state.items()},
                {k: v.dtype for k, v in state.items()},
                {k: v.numel() * v.element_size() for k, v in state.items()},
                lambda key: state[key].clone(),
            )
        raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model.bin weights")


def split_model(
    source: str | Path,
    output: str | Path,
    num_partitions: int,
    ranges: Sequence[LayerRange] | None = None,
    dtype: str = "auto",
    progress: bool | None = None,
    quantize: str | None = None,
) -> Manifest:
    """Split ``source`` (a checkpoint folder, a GGUF file, or an embedded model's name) into ``num_partitions``
    files in ``output``; ``quantize`` (int8, int4; gguf: the embedded model's own GGUF file) quantizes the linear
    weights (see :mod:`chatloop.quant.scheme`)."""
    if quantize is not None and quantize not in SCHEMES:
        raise ValueError(f"--quantize {quantize!r} is not one of {', '.join(SCHEMES)}")
    gguf_file = gguf_path(source, quantize)
    if gguf_file is not None:
        checkpoint, config, folder = open_gguf(gguf_file)
        quantize = "gguf"
    elif quantize == "gguf":
        raise ValueError(f"--quantize gguf needs a GGUF file (or an embedded model): {source} is not one")
    else:
        folder = resolve_model(source)
        config = json.loads((folder / "config.json").read_text())
        checkpoint = None  # opened once the config is known to be a model ChatLoop runs
    args = ModelArgs.from_hf_config(config)
    family = family_of(args)
    checkpoint = checkpoint or CheckpointSource.open(folder)
    # Mixture-of-experts layers can differ many times over in bytes (dense layers among sparse ones): split those
    # by bytes. Dense families' layers are all alike and keep the split by count.
    layer_bytes = _layer_bytes(family, checkpoint, args.num_layers) if args.moe and ranges is None else None
    plan = plan_layers(args.num_layers, num_partitions, ranges=ranges, layer_bytes=layer_bytes)
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    if quantize and args.family == "gpt2":
        raise ValueError("--quantize supports Llama-family checkpoints (Llama, Mistral, Qwen2), not GPT-2")
    if quantize and dtype not in ("auto", "float32"):
        raise ValueError(f"--quantize {quantize} keeps the other tensors in float32: leave out --dtype {dtype}")

    source_name = {family.canonical(k): k for k in checkpoint.names}  # partitions use the canonical names
    if args.moe:
        check_expert_layout(source_name)
    owned: list[list[str]] = [[] for _ in plan]
    for key in source_name:
        for stage in family.stages_of(key, plan, args.tie_word_embeddings):
            owned[stage].append(key)
    if args.tie_word_embeddings and family.tied_key not in source_name:
        raise ValueError(f"{folder}: tie_word_embeddings is set but {family.tied_key} is missing")

    formats = {}  # the partitions' quantized tensors: canonical name -> format
    for key, name in source_name.items():
        stored = checkpoint.formats.get(name)
        if stored is not None:
            formats[key] = "q4_1" if stored == "q4_0" else stored  # q4_0 is rewritten, not dequantized
        elif quantize in ("int8", "int4"):
            fmt = format_for(key, checkpoint.shapes[name], quantize)
            if fmt is not None:
                formats[key] = fmt
    wanted = "float32" if quantize else dtype

    def target_dtype(key: str) -> torch.dtype:
        if key in formats:
            return torch.uint8
        source_dtype = checkpoint.dtypes[source_name[key]]
        return DTYPE_NAMES[wanted] if wanted != "auto" and source_dtype.is_floating_point else source_dtype

    def target_shape(key: str) -> tuple[int, ...]:
        shape = checkpoint.shapes[source_name[key]]
        if key not in formats:
            return shape
        return (shape[0], row_bytes(formats[key], shape[1]))

    def target_tensor(key: str) -> torch.Tensor:
        name = source_name[key]
        tensor = checkpoint.read(name)
        if checkpoint.formats.get(name) == "q4_0":
            return q4_0_as_q4_1(tensor)
        if key in formats and name not in checkpoint.formats:
            return torch.cat([quantize_matrix(tensor[i : i + QUANTIZE_ROWS], formats[key])
                              for i in range(0, tensor.shape[0], QUANTIZE_ROWS)])
        return tensor.to(target_dtype(key))

    float_dtypes = {target_dtype(k) for k in source_name
                    if k not in formats and checkpoint.dtypes[source_name[k]].is_floating_point}
    if len(float_dtypes) > 1:
        raise ValueError(f"{folder} mixes floating dtypes {sorted(map(str, float_dtypes))}: pass --dtype to pick one")
    dtype_name = str(float_dtypes.pop()).removeprefix("torch.") if float_dtypes else "float32"

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    total = sum(checkpoint.sizes[source_name[k]] for keys in owned for k in keys)
    partitions = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"splitting {folder.name}",
              disable=None if progress is None else not progress) as bar:
        for index, (layers, keys) in enumerate(zip(plan, owned)):
            path = output / f"partition_{index}.safetensors"
            tmp = path.with_suffix(".tmp")
            layout = [(k, target_dtype(k), target_shape(k)) for k in keys]
            metadata = {"format": "pt", "layers": str(layers)}
            if any(k in formats for k in keys):
                metadata[QUANTIZED_KEY] = json.dumps({k: formats[k] for k in keys if k in formats})
            writer = StreamingWriter(tmp, layout, metadata=metadata)
            for key in keys:
                writer.add(key, target_tensor(key))
                bar.update(checkpoint.sizes[source_name[key]])
            digest = writer.close()
            os.replace(tmp, path)
            partitions.append(
                PartitionInfo(
                    index=index,
                    file=path.name,
                    start_layer=layers.start,
                    end_layer=layers.end,
                    has_embeddings=index == 0,
                    has_head=index == len(plan) - 1,
                    num_bytes=path.stat().st_size,
                    sha256=digest,
                    num_tensors=len(keys),
                    blake3=writer.digests.get("blake3"),
                )
            )
    for stale in output.glob("partition_*.safetensors"):
        if stale.name not in {p.file for p in partitions}:  # an earlier split's
            stale.unlink()
    for stamp in output.glob(f"partition_*.safetensors{OLD_STAMP_SUFFIX}"):  # nothing reads them any more
        stamp.unlink()
    manifest = Manifest(
        model_config=config,
        dtype=dtype_name,
        partitions=partitions,
        tokenizer_files=copy_tokenizer(folder, output),
        source=str(gguf_file or source),
        quantization=quantize,
    )
    manifest.save(output)
    write_worker_configs(output, manifest)
    return manifest


def _layer_bytes(family: Family, checkpoint: CheckpointSource, num_layers: int) -> list[int]:
    """Each decoder layer's bytes in the source checkpoint (a quantized split shrinks them alike)."""
    sizes = [0] * num_layers
    for name in checkpoint.names:
        match = family.layer_pattern.match(family.canonical(name))
        if match and int(match.group(1)) < num_layers:
            sizes[int(match.group(1))] += checkpoint.sizes[name]
    return sizes


def write_worker_configs(output: Path, manifest: Manifest) -> list[Path]:
    """``configs/worker-config-N.yaml`` in ``output``, one per partition, in the reference deployment's layout."""
    from ..worker_config import CONFIG_DIR, worker_files

    folder = Path(output) / CONFIG_DIR
    folder.mkdir(exist_ok=True)
    files = worker_files(manifest.num_partitions, [(p.start_layer, p.end_layer, p.file) for p in manifest.partitions])
    paths = []
    for config in files:
        path = folder / f"worker-config-{config.worker}.yaml"
        path.write_text(config.as_yaml())
        paths.append(path)
    for stale in folder.glob("worker-config-*.yaml"):  # an earlier split's, into more parts
        if stale not in paths:
            stale.unlink()
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``chatloop-split --model SOURCE --output DIR --num-partitions N [--ranges 0-7,8-15,...] [--dtype bfloat16]
    [--quantize int8|int4]``."""
    parser = argparse.ArgumentParser(prog="chatloop-split", description=__doc__)
    parser.add_argument("--model", required=True,
                        help="a Hugging Face checkpoint folder, a .gguf file, or 'smollm2' (embedded)")
    parser.add_argument("--output", required=True, help="folder for partition_N.safetensors and manifest.json")
    parser.add_argument("--num-partitions", type=int, required=True, help="number of stages (workers)")
    parser.add_argument("--ranges", help="explicit inclusive layer ranges, e.g. 0-7,8-15,16-23,24-31")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES], help="convert floating tensors")
    parser.add_argument("--quantize", choices=SCHEMES,
                        help="int8 (q8_0) or int4 (q4_1 layers, q8_0 embedding) weights; a GGUF --model keeps its own")
    ns = parser.parse_args(argv)
    try:
        ranges = parse_ranges(ns.ranges) if ns.ranges else None
        manifest = split_model(ns.model, ns.output, ns.num_partitions, ranges=ranges, dtype=ns.dtype,
                               quantize=ns.quantize)
    except (ValueError, OSError) as e:  # OSError: a missing model, an --output that is a file, a full disk
        print(f"chatloop-split: error: {e}", file=sys.stderr)
        return 2
    for p in manifest.partitions:
        print(f"{ns.output}/{p.file}: layers {p.layers}, {p.num_bytes / 2**20:.1f} MiB, {p.num_tensors} tensors")
    print(f"{ns.output}/manifest.json")
    for p in manifest.partitions:
        print(f"{ns.output}/configs/worker-config-{p.index}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
