"""Tiny GGUF files of every tensor type ChatLoop keeps, written with gguf-py's ``GGUFWriter``.

gguf-py quantizes only the legacy types, so the k-quant tensors are random but valid blocks: random quant bits,
float16 scales of magnitudes that keep the weights near 0.05. The metadata is what convert_hf_to_gguf writes for a
Llama (the keys transformers and ChatLoop read), with a byte-level SentencePiece-style vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TYPE_CYCLE = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"]
"""The matrices' types, in the order the tensors below take them (every type at least once)."""

# Per type: byte offsets of its float16 scale fields and a scale that keeps its weights near +-0.05.
_SCALES = {
    "Q4_0": ([0], 0.05 / 8), "Q4_1": ([0, 2], 0.1 / 15), "Q5_0": ([0], 0.05 / 16), "Q5_1": ([0, 2], 0.1 / 31),
    "Q8_0": ([0], 0.05 / 127), "Q2_K": ([80, 82], 0.1 / 45), "Q3_K": ([108], 0.05 / 128),
    "Q4_K": ([0, 2], 0.1 / 945), "Q5_K": ([0, 2], 0.1 / 1953), "Q6_K": ([208], 0.05 / 4096),
}
_MIN_FIELD = {"Q4_1": 2, "Q5_1": 2}
"""Types whose second field is a minimum (negative, about half the range), not a scale."""


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols] weights of GGUF type ``kind`` as the uint8 rows a file stores: random quants, sane scales."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if kind == "F32":
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    if kind == "F16":
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
    if kind == "BF16":
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    data = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    offsets, scale = _SCALES[kind]
    for offset in offsets:
        value = (rng.uniform(0.3, 1.0, size=data.shape[0]) * scale).astype(np.float16)
        if _MIN_FIELD.get(kind) == offset:
            value = -value * 8  # about half the range a block spans
        data[:, offset : offset + 2] = value.view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def write_tiny_llama(path: Path, types: list[str] | None = None, seed: int = 0, tied: bool = False) -> dict:
    """A 2-layer Llama (hidden 256, 4 heads of 64, 2 KV heads, MLP 512, vocab 291) at ``path``; its matrices take
    ``types`` in turn (default :data:`TYPE_CYCLE`). Returns {GGUF tensor name: type}."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, mlp, layers = 256, 4, 2, 512, 2
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    words = ["▁the", "▁a", "▁of", "▁and", "▁to", "▁in", "▁is", "▁it", "▁fox", "▁dog", "▁cat", "▁runs", "▁jumps",
             "▁over", "▁lazy", "▁quick", "▁brown", "▁red", "▁big", "▁small", "▁day", "▁night", "▁sun", "▁moon",
             "▁tree", "▁house", "▁water", "▁fire", "▁earth", "▁wind", "▁sky", "▁sea"]
    tokens += words
    types = types or TYPE_CYCLE
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-every-type")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(mlp)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)

    shapes = {"token_embd.weight": (len(tokens), hidden)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv_heads * 64, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * 64, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (mlp, hidden), f"blk.{i}.ffn_up.weight": (mlp, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, mlp),
        }
    if not tied:
        shapes["output.weight"] = (len(tokens), hidden)
    chosen = {}
    for n, (name, (rows, cols)) in enumerate(shapes.items()):
        kind = types[n % len(types)]
        data = random_blocks(kind, rows, cols, rng)
        raw = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, data, raw_dtype=raw)
        chosen[name] = kind
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return chosen


def copy_metadata(reader, writer, skip: tuple[str, ...] = ()) -> None:
    """Every key-value of ``reader``'s file (but the header's, the architecture and ``skip``) into ``writer``."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in skip:
            continue
        sub = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub)


def split_gguf(path: Path, max_tensors: int) -> list[Path]:
    """``path`` rewritten as shards of at most ``max_tensors`` tensors beside it (NAME-00001-of-0000N.gguf), as
    llama.cpp's gguf-split writes them: all metadata in the first, the split keys in each."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(path.with_name(f"{path.stem}-split.gguf"), arch, split_max_tensors=max_tensors)
    copy_metadata(reader, writer)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path.with_name(f"{path.stem}-split.gguf"))


if __name__ == "__main__":
    import sys

    print(write_tiny_llama(Path(sys.argv[1])))
