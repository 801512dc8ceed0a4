"""Tiny GGUF files of every tensor type ChatLoop keeps, written with gguf-py's ``GGUFWriter``.

gguf-py quantizes only the legacy types, so the k-quant tensors are random but valid blocks: random quant bits,
float16 scales of magnitudes that keep the weights near 0.05. The metadata is what convert_hf_to_gguf writes for a
Llama (the keys transformers and ChatLoop read), with a byte-level SentencePiece-style vocabulary.
"""

from __future__ import annotations

import math
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


GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "granite": "granite", "olmo2": "olmo2"}
"""The GGUF architecture llama.cpp's converter writes for each transformers model type."""
_PERMUTED = ("llama", "mixtral", "granite")
"""Families whose query and key rows llama.cpp's converter reorders (LlamaModel.permute)."""
_EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_vocab() -> list[str]:
    """A byte-level SentencePiece-style vocabulary of 291 tokens: <unk>, <s>, </s>, 256 bytes, 32 words."""
    words = ["▁the", "▁a", "▁of", "▁and", "▁to", "▁in", "▁is", "▁it", "▁fox", "▁dog", "▁cat", "▁runs", "▁jumps",
             "▁over", "▁lazy", "▁quick", "▁brown", "▁red", "▁big", "▁small", "▁day", "▁night", "▁sun", "▁moon",
             "▁tree", "▁house", "▁water", "▁fire", "▁earth", "▁wind", "▁sky", "▁sea"]
    return ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *words]


def _add_vocab(writer, chat_template: str | None = None) -> None:
    tokens = tiny_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rotary halves interleaved (rows; a bias too)."""
    heads = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_hparams(writer, config, family: str) -> None:
    """The metadata llama.cpp's converter writes for ``family`` (conversion/*.py, set_gguf_parameters)."""
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if family in ("llama", "mixtral", "granite"):
        writer.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters if "rope_type" in (c.rope_parameters or {}) else (c.rope_parameters or {}).get(
        "full_attention", {})
    if family != "gemma2":  # llama.cpp's Gemma 2 converter leaves it out (10000)
        writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if family in ("llama", "mixtral", "granite"):
        writer.add_rope_dimension_count(head_dim)
    if family in ("qwen3", "qwen3_moe", "gemma2", "gemma3_text") or (family == "llama" and c.head_dim):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family == "mixtral":
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if family == "qwen3_moe":
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if family == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
    if family == "gemma3_text":
        if c.final_logit_softcapping:
            writer.add_final_logit_softcapping(c.final_logit_softcapping)
        writer.add_sliding_window(c.sliding_window)
        writer.add_rope_freq_base_swa(c.rope_parameters["sliding_attention"]["rope_theta"])
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf_rope_type("linear"))
            writer.add_rope_scaling_factor(rope["factor"])
    if family == "phi3":
        rotated = int(c.rope_parameters.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        writer.add_rope_dimension_count(rotated)
        writer.add_sliding_window(c.sliding_window or 0)
        original = c.rope_parameters["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        if c.rope_parameters.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1
                                                 else 1.0)
    if family == "granite":
        writer.add_attention_scale(c.attention_multiplier)
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_logit_scale(c.logits_scaling)


def gguf_rope_type(name: str):
    import gguf

    return gguf.RopeScalingType[name.upper()]


def write_gguf_from_hf(folder: Path, path: Path, kind: str = "F32", chat_template: str | None = None) -> dict:
    """The saved transformers checkpoint in ``folder`` as llama.cpp's converter writes it, at ``path``: names by
    gguf-py's ``TensorNameMap``, experts stacked [E, rows, cols], Llama-style query/key rows reordered, Gemma's
    norms +1, Phi-3's longrope factors as tensors; matrices (not the routers) of type ``kind`` (F32, F16, or a
    type gguf-py quantizes), the rest F32. Returns {checkpoint name: the float32 value the file stands for, in the
    checkpoint's layout} (Gemma 2's head, which the file does not hold, left out)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    family = config.model_type
    arch = GGUF_ARCH[family]
    state = {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items()}
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{family}")
    _add_hparams(writer, config, family)
    _add_vocab(writer, chat_template)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = None if kind in ("F32", "F16") else qtype

    def encode(value: np.ndarray, matrix: bool) -> np.ndarray:
        """What the file stores for ``value``: matrices in ``kind``, the rest float32."""
        if not matrix or kind == "F32":
            return value.astype(np.float32)
        return value.astype(np.float16) if kind == "F16" else gguf.quants.quantize(value.astype(np.float32), qtype)

    def held(value: np.ndarray, matrix: bool) -> np.ndarray:
        """The float32 value that ``encode(value)`` stands for (reordering rows commutes with it: blocks are
        row-wise)."""
        data = encode(value, matrix)
        if data.dtype == np.uint8:
            return gguf.quants.dequantize(data, qtype).reshape(value.shape)
        return data.astype(np.float32)

    values = {}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    for name, value in state.items():
        parts = name.split(".")
        if ".experts." in name:  # model.layers.L.(mlp|block_sparse_moe).experts.E.PART.weight
            experts.setdefault((int(parts[2]), _EXPERT_PARTS[parts[6]]), {})[int(parts[5])] = value
            values[name] = held(value, True)
            continue
        if family == "gemma2" and name == "lm_head.weight":
            continue  # llama.cpp's Gemma 2 has no head of its own
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        matrix = value.ndim == 2 and not gguf_name.endswith("ffn_gate_inp.weight")  # routers stay float32
        values[name] = held(value, matrix)
        if family.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1  # llama.cpp's Gemma norms hold the +1 of (1 + w)
        if family in _PERMUTED and ".q_proj." in name:
            value = _permute(value, n_head, n_head)
        if family in _PERMUTED and ".k_proj." in name:
            value = _permute(value, n_head, n_kv)
        writer.add_tensor(gguf_name, encode(value, matrix), raw_dtype=raw if matrix else None)
    for (layer, part), by_expert in sorted(experts.items()):
        data = np.stack([encode(by_expert[e], True) for e in sorted(by_expert)])
        writer.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", data, raw_dtype=raw)
    if family == "llama" and config.rope_parameters.get("rope_type") == "llama3":  # as conversion/llama.py does
        from chatloop.partition.gguf_config import llama3_rope_factors

        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        writer.add_tensor("rope_freqs.weight", np.array(llama3_rope_factors(config.rope_parameters, head_dim),
                                                        dtype=np.float32))
    if family == "phi3" and config.rope_parameters.get("rope_type") == "longrope":
        for which in ("long", "short"):
            writer.add_tensor(f"rope_factors_{which}.weight",
                              np.array(config.rope_parameters[f"{which}_factor"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


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
