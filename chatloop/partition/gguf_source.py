"""A GGUF file as a splitter source: its tensors under Hugging Face's names, quantized ones as their bytes.

Quantized tensors (``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q8_0``, ``Q2_K`` to ``Q6_K``) and the float16 and
bfloat16 matrices of linear and embedding layers are read as the uint8 rows they are stored as and never
dequantized (:mod:`chatloop.quant.blocks`); llama.cpp's reordering of the query and key rows (for its rotary
layout) is undone on those rows, as transformers does for dequantized ones. Other float tensors (norms) are read as
they are; other types (``IQ*``, ``TQ*``) are refused. The model's config and tokenizer come from the file through
transformers, saved once in the cache.
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

__all__ = ["gguf_path", "open_gguf"]

_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
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


def hf_name(name: str) -> str:
    """A GGUF tensor name as transformers names it (Llama family)."""
    match = _BLOCK_NAME.match(name)
    if match:
        layer, part, kind = match.groups()
        if part not in _LAYER:
            raise ValueError(f"GGUF tensor {name}: ChatLoop does not know {part!r} (a Llama-family model's tensors)")
        return f"model.layers.{layer}.{_LAYER[part]}.{kind}"
    stem, _, kind = name.rpartition(".")
    if stem not in _TOP:
        raise ValueError(f"GGUF tensor {name} is not a Llama-family model's")
    return f"{_TOP[stem]}.{kind}"


def _model_files(path: Path, config: dict) -> Path:
    """A folder with the file's config.json, tokenizer and generation config (made once, in the cache)."""
    from transformers import AutoTokenizer, GenerationConfig, PretrainedConfig

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    GenerationConfig.from_model_config(PretrainedConfig(**config)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def open_gguf(path: Path):
    """(a ``CheckpointSource`` of the file's tensors, its config.json dict, a folder with its tokenizer)."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    from .splitter import CheckpointSource

    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config = hf_config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [hf_config.architectures[0] if hf_config.architectures
                               else f"{hf_config.model_type.capitalize()}ForCausalLM"]
    config["dtype"] = "float32"
    reader = gguf.GGUFReader(path)
    processor = TENSOR_PROCESSORS.get(hf_config.model_type, TensorProcessor)(config=config)
    tensors = {hf_name(t.name): t for t in reader.tensors}
    if config.get("tie_word_embeddings") is None:
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    formats, dtypes, shapes, sizes = {}, {}, {}, {}
    for name, t in tensors.items():
        kind = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest dimension first
        if kind in _QUANTIZED:
            formats[name], dtypes[name] = _QUANTIZED[kind], torch.uint8
        elif kind in _KEPT_FLOAT and len(shape) == 2 and module_kind(name) is not None:
            formats[name], dtypes[name] = _KEPT_FLOAT[kind], torch.uint8
        elif kind in _FLOAT:
            dtypes[name] = _FLOAT[kind]
        else:
            raise ValueError(f"{path}: tensor {t.name} is {kind}; ChatLoop reads {SUPPORTED} tensors: requantize "
                             f"the file to one of them (llama-quantize --allow-requantize)")
        shapes[name], sizes[name] = shape, int(t.n_bytes)

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        data = np.array(t.data)  # a copy: the reader's arrays map the file read-only
        if name not in formats:
            data = data.reshape(shapes[name])
        elif data.dtype != np.uint8:  # the reader gives float16 / bfloat16 (as uint16) matrices as their values
            data = data.reshape(shapes[name]).view(np.uint8).reshape(shapes[name][0], -1)
        data = processor.process(data, t.name).weights  # undoes llama.cpp's query/key row order
        return torch.from_numpy(np.ascontiguousarray(data))

    source = CheckpointSource(list(tensors), shapes, dtypes, sizes, read, formats)
    return source, config, _model_files(path, config)
