"""A GGUF file (or the shards of a split one) as a splitter source: its tensors under Hugging Face's names,
quantized ones as their bytes.

Quantized tensors (``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``, ``Q2_K`` to ``Q6_K``) and the float16 and
bfloat16 matrices of linear and embedding layers are read as the uint8 rows they are stored as and never
dequantized (:mod:`chatloop.quant.blocks`); a stacked expert tensor ``[E, rows, cols]`` is read one expert's rows
at a time. llama.cpp's reordering of the query and key rows (for its rotary layout) is undone on those rows, and
Gemma's norms lose the +1 llama.cpp adds, as transformers does for dequantized ones. Other float tensors (norms)
are read as they are; other types (``IQ*``, ``TQ*``) are refused. Names: :mod:`.gguf_names`; the config:
:mod:`.gguf_config`; the tokenizer and chat template come from the file through transformers, saved once in the
cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..embedded import EMBEDDED_MODELS, embedded_gguf
from ..paths import cache_root
from ..quant.scheme import module_kind

__all__ = ["gguf_path", "gguf_shards", "open_gguf"]

_SHARD = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
"""A shard's name as llama.cpp's gguf-split (and convert_hf_to_gguf --split-max-*) writes it."""

_QUANTIZED = {kind: kind.lower() for kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                              "Q6_K")}
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_KEPT_FLOAT = {"F16": "f16", "BF16": "bf16"}
"""Half-precision matrices kept as their bytes (a linear or embedding layer's weight), not widened to float32."""
SUPPORTED = ", ".join([*_QUANTIZED, *_FLOAT])


def gguf_path(source: str | Path, quantize: str | None) -> Path | None:
    """The GGUF file to split: ``source`` itself if it is one, the embedded model's with ``quantize=gguf``."""
    if str(source).lower().endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        return path
    if quantize == "gguf" and str(source).lower() in EMBEDDED_MODELS:
        return embedded_gguf(str(source).lower())
    return None


def _model_files(path: Path, config: dict, transformers_arch: bool) -> Path:
    """A folder with the file's config.json, tokenizer (with its chat template) and generation config, in the
    cache: the tokenizer made once a file, the config written afresh (it is computed anew on each split)."""
    from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        # AutoTokenizer reads the model's config from the file first, which transformers cannot for every
        # architecture; the tokenizer itself comes from the tokenizer.* metadata alike.
        reader = AutoTokenizer if transformers_arch else PreTrainedTokenizerFast
        reader.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    GenerationConfig.from_model_config(PretrainedConfig(**config)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def gguf_shards(path: Path) -> list[Path]:
    """Every shard of the split GGUF that ``path`` is one of (``NAME-00002-of-00003.gguf``), first to last; just
    ``path`` for a whole file. A missing shard is refused by name."""
    match = _SHARD.match(path.name)
    if not match:
        return [path]
    count = int(match["count"])
    shards = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is one of {count} shards of a split GGUF; {', '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}: download "
                                "every shard into the same folder")
    return shards


def _metadata(reader) -> dict:
    """The file's key-value metadata as Python values (arrays of strings or numbers as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _read_shards(shards: list[Path]):
    """(the first shard's metadata, {tensor name: reader tensor} over all shards), the split keys checked."""
    import gguf

    readers = [gguf.GGUFReader(s) for s in shards]
    metadata = _metadata(readers[0])
    count = metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1)
    if count != len(shards):
        raise ValueError(f"{shards[0]}: its metadata says {count} shard(s), its name {len(shards)}: rename it back "
                         "to the name llama.cpp's gguf-split gave it (NAME-00001-of-0000N.gguf)")
    tensors = {}
    for number, (shard, reader) in enumerate(zip(shards, readers)):
        fields = _metadata(reader)
        if len(shards) > 1 and fields.get(gguf.Keys.Split.LLM_KV_SPLIT_NO) != number:
            raise ValueError(f"{shard}: its metadata says it is shard {fields.get(gguf.Keys.Split.LLM_KV_SPLIT_NO)},"
                             f" its name shard {number} (counting from 0): the shards are mixed up")
        tensors |= {t.name: t for t in reader.tensors}
    expected = metadata.get(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors))
    if len(tensors) != expected:
        raise ValueError(f"{shards[0]}: the shards hold {len(tensors)} tensors, the metadata says {expected}: "
                         "a shard is from another file or damaged")
    return metadata, tensors


def open_gguf(path: Path):
    """(a ``CheckpointSource`` of the file's tensors, its config.json dict, a folder with its tokenizer); a split
    file's shards are read together."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor

    from ..models.args import ModelArgs
    from .gguf_config import IGNORED_TENSORS, TRANSFORMERS_ARCHS, gguf_config
    from .gguf_names import gguf_to_hf
    from .splitter import CheckpointSource

    shards = gguf_shards(path)
    metadata, file_tensors = _read_shards(shards)

    def read_float(name: str) -> np.ndarray:
        return np.array(file_tensors[name].data, dtype=np.float32)

    config = gguf_config(shards[0], metadata, set(file_tensors), read_float)
    arch, family = metadata["general.architecture"], config["model_type"]
    # llama.cpp reorders the query and key rows of Llama-style models (Granite's too) for its rotary layout, and
    # stores Gemma's norms with their +1; transformers' processors undo both.
    processors = TENSOR_PROCESSORS | {"granite": LlamaTensorProcessor}
    processor = processors.get(arch, TensorProcessor)(config=config)
    num_experts = ModelArgs.from_hf_config(config).moe.num_experts if family in ("mixtral", "qwen3_moe") else 0
    tensors: dict[str, tuple] = {}  # HF name -> (reader tensor, expert index or None)
    for name, t in file_tensors.items():
        if name in IGNORED_TENSORS:
            continue
        for hf, expert in gguf_to_hf(name, arch, family, config["num_hidden_layers"], num_experts):
            tensors[hf] = (t, expert)
    formats, dtypes, shapes, sizes = {}, {}, {}, {}
    for name, (t, expert) in tensors.items():
        kind = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        if expert is not None:
            if shape[0] != num_experts:
                raise ValueError(f"{path}: {t.name} holds {shape[0]} experts, the metadata says {num_experts}")
            shape = shape[1:]
        if kind in _QUANTIZED:
            formats[name], dtypes[name] = _QUANTIZED[kind], torch.uint8
        elif kind in _KEPT_FLOAT and len(shape) == 2 and module_kind(name) is not None:
            formats[name], dtypes[name] = _KEPT_FLOAT[kind], torch.uint8
        elif kind in _FLOAT:
            dtypes[name] = _FLOAT[kind]
        else:
            raise ValueError(f"{path}: tensor {t.name} is {kind}; ChatLoop reads {SUPPORTED} tensors: requantize "
                             f"the file to one of them (llama-quantize --allow-requantize)")
        shapes[name], sizes[name] = shape, int(t.n_bytes) // (num_experts if expert is not None else 1)

    def read(name: str) -> torch.Tensor:
        t, expert = tensors[name]
        data = t.data if expert is None else t.data[expert]  # an expert's rows lie together: its bytes alone
        data = np.array(data)  # a copy: the reader's arrays map the file read-only
        if name not in formats:
            data = data.reshape(shapes[name])
        elif data.dtype != np.uint8:  # the reader gives float16 / bfloat16 (as uint16) matrices as their values
            data = data.reshape(shapes[name]).view(np.uint8).reshape(shapes[name][0], -1)
        else:
            data = data.reshape(shapes[name][0], -1)
        if expert is None:
            data = processor.process(data, t.name).weights  # query/key row order, Gemma's norms
        return torch.from_numpy(np.ascontiguousarray(data))

    source = CheckpointSource(list(tensors), shapes, dtypes, sizes, read, formats)
    return source, config, _model_files(shards[0], config, arch in TRANSFORMERS_ARCHS)
