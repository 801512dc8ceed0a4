"""Random-weight Llama checkpoints of real models' shapes, written tensor by tensor.

Benchmarks need the memory traffic of TinyLlama-1.1B and Llama-2-7B, not their answers, and
no network: this writes ``config.json`` + ``model.safetensors`` (+ SmolLM2's tokenizer, so
that ChatLoop and transformers load the folder) with random weights, one tensor in memory at
a time (the 7B file is 13.5 GB in bfloat16). Folders live in the cache, never in the repo:

    python -m benchmarks.checkpoints tinyllama-1.1b            # ~/.cache/chatloop/models/random-tinyllama-1.1b-bfloat16
    python -m benchmarks.checkpoints llama2-7b --dtype bfloat16
    python -m benchmarks.sweep model.name=random:tinyllama-1.1b model.dtype=bfloat16 ...

The tokenizer is SmolLM2's (vocabulary 49152) while most of these models have 32000 tokens: the
benchmarks send token ids below the model's vocabulary, so the tokenizer only has to load. Where a
benchmark sends text (chat prompts), use a shape with SmolLM2's vocabulary (``llama2-7b-v49152``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

__all__ = [
    "LlamaShape",
    "SHAPES",
    "RANDOM_PREFIX",
    "random_checkpoint",
    "write_random_checkpoint",
    "resolve_model_name",
    "main",
]

RANDOM_PREFIX = "random:"
"""``model.name=random:SHAPE`` in a sweep means the random checkpoint of that shape (made on first use)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The tokenizer files copied from the embedded SmolLM2 (its config.json and generation config are not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class LlamaShape:
    """The hyper-parameters of a Llama-architecture model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def layout(self, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """Every tensor (name, dtype, shape) in the order transformers' LlamaForCausalLM names them."""
        c, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", dtype, (self.vocab_size, c))]
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", dtype, (c,)),
                (p + "self_attn.q_proj.weight", dtype, (c, c)),
                (p + "self_attn.k_proj.weight", dtype, (kv, c)),
                (p + "self_attn.v_proj.weight", dtype, (kv, c)),
                (p + "self_attn.o_proj.weight", dtype, (c, c)),
                (p + "post_attention_layernorm.weight", dtype, (c,)),
                (p + "mlp.gate_proj.weight", dtype, (f, c)),
                (p + "mlp.up_proj.weight", dtype, (f, c)),
                (p + "mlp.down_proj.weight", dtype, (c, f)),
            ]
        out += [("model.norm.weight", dtype, (c,)), ("lm_head.weight", dtype, (self.vocab_size, c))]
        return out

    def num_params(self) -> int:
        return sum(_numel(shape) for _, _, shape in self.layout(torch.float32))

    def hf_config(self, dtype: str) -> dict:
        """The ``config.json`` of a LlamaForCausalLM of this shape (untied head, as TinyLlama and Llama 2)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "dtype": dtype,
            "torch_dtype": dtype,
            "use_cache": True,
        }


LLAMA2_7B = LlamaShape(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                       max_position_embeddings=4096)

SHAPES = {
    # Seconds to write; what tests/benchmarks runs through the sweep.
    "tiny": LlamaShape(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128),
    # TinyLlama-1.1B: 1.1 B parameters, 2.2 GB in bfloat16.
    "tinyllama-1.1b": LlamaShape(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
    # Llama-2-7B: 6.7 B parameters, 13.5 GB in bfloat16.
    "llama2-7b": LLAMA2_7B,
    # Llama-2-7B with SmolLM2's vocabulary (6.88 B parameters, 13.8 GB in bfloat16): the tokenizer copied in then
    # covers the model, so chat prompts (the speculation benchmark's) and convert_hf_to_gguf.py accept it.
    "llama2-7b-v49152": replace(LLAMA2_7B, vocab_size=49152),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def write_random_checkpoint(
    shape: LlamaShape,
    folder: str | Path,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: bool = False,
    label: str | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``shape`` into ``folder`` (created); return the folder.

    Matrices are N(0, 0.02) (transformers' Llama init), norm weights 1. Peak memory is one
    tensor (the embedding: 32000 x 4096 for the 7B shape, 262 MB in bfloat16).
    """
    from chatloop.embedded import embedded_checkpoint
    from chatloop.partition.safetensors_stream import StreamingWriter

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    layout = shape.layout(torch_dtype)
    writer = StreamingWriter(folder / "model.safetensors", layout, metadata={"format": "pt", "random_seed": str(seed)})
    generator = torch.Generator().manual_seed(seed)
    total = sum(_numel(s) for _, _, s in layout)
    written, started, shown = 0, time.monotonic(), 0.0
    for name, _, tensor_shape in layout:
        if len(tensor_shape) == 1:
            tensor = torch.ones(tensor_shape, dtype=torch_dtype)
        else:
            tensor = torch.empty(tensor_shape, dtype=torch_dtype).normal_(0.0, 0.02, generator=generator)
        writer.add(name, tensor)
        written += tensor.numel()
        del tensor
        if progress and (time.monotonic() - shown > 1 or written == total):
            shown = time.monotonic()
            print(
                f"\r{label or folder.name}: {written / total:6.1%} of {total / 1e9:.3f} B parameters, "
                f"{time.monotonic() - started:.0f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(file=sys.stderr)
    writer.close()
    (folder / "config.json").write_text(json.dumps(shape.hf_config(dtype), indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_source = embedded_checkpoint("smollm2")
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy2(tokenizer_source / name, folder / name)
    return folder


def random_checkpoint(
    name: str, dtype: str = "bfloat16", root: str | Path | None = None, progress: bool = True
) -> Path:
    """The random checkpoint ``name`` (a key of :data:`SHAPES`), written once into ``root`` (default: the cache)."""
    from chatloop.paths import cache_root

    if name not in SHAPES:
        raise ValueError(f"no random checkpoint shape {name!r}: choose one of {', '.join(SHAPES)}")
    root = Path(root) if root is not None else cache_root() / "models"
    target = root / f"random-{name}-{dtype}"
    if (target / "config.json").is_file():  # written last: its presence means the folder is complete
        return target
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so that a killed run never leaves half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        write_random_checkpoint(SHAPES[name], tmp, dtype=dtype, progress=progress, label=target.name)
        tmp.chmod(0o755)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
            return target
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_name(name: str, dtype: str = "bfloat16") -> str:
    """``random:SHAPE`` becomes that checkpoint's folder (written on first use); other names pass through.

    The checkpoint is written in bfloat16 unless ``dtype`` is float32 or float16 (``model.dtype``).
    """
    if not name.startswith(RANDOM_PREFIX):
        return name
    return str(random_checkpoint(name.removeprefix(RANDOM_PREFIX), dtype=dtype))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--out", help="write into this folder instead of the cache")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    shape = SHAPES[ns.shape]
    print(
        f"{ns.shape}: {shape.num_params() / 1e9:.3f} B parameters, "
        f"{shape.num_params() * DTYPES[ns.dtype].itemsize / 1e9:.2f} GB in {ns.dtype}",
        file=sys.stderr,
    )
    if ns.out:
        path = write_random_checkpoint(shape, ns.out, dtype=ns.dtype, seed=ns.seed, progress=True)
    else:
        path = random_checkpoint(ns.shape, dtype=ns.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
