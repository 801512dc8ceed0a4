"""GGUF files as people download them: every tensor type llama.cpp's quantizer writes (the k-quants, Q5_0, Q5_1,
F16, BF16 beside Q4_0, Q4_1, Q8_0, F32) split as their bytes, dequantized bit for bit as gguf-py does, and run to
what transformers computes on the same file; other types refused by name."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_files import TYPE_CYCLE, random_blocks, write_tiny_llama
from safetensors import safe_open
from test_golden import check_against_reference

import chatloop.quant.modules as quant_modules
from chatloop.kernels import (
    GGUF_FORMAT_IDS,
    available_isas,
    kernel_gguf_linear,
    kernel_kquant_interleave,
    kernel_kquant_linear,
    kernel_kquant_rows,
    load_quant_kernels,
    quant_isa,
)
from chatloop.partition.manifest import QUANTIZED_KEY
from chatloop.partition.splitter import split_model
from chatloop.quant import GGUF_TYPES, QuantEmbedding, QuantLinear, dequantize, row_bytes
from chatloop.quant.blocks import reference_decode_linear

KEPT = [t for t in TYPE_CYCLE if t != "F32"]


# ---- the reference dequantizers ------------------------------------------------------------------------------------
def _edge_blocks(fmt: str, rng: np.random.Generator) -> np.ndarray:
    """Random bytes, then blocks of all-zero and all-one bits, and blocks whose every float16 field is an edge value
    (zeros of both signs, the smallest subnormal, the largest finite, infinities, NaN)."""
    weights, nbytes = GGUF_TYPES[fmt]
    count = max(1, 256 // weights)  # whole rows of 256 weights
    data = rng.integers(0, 256, size=(24 * count, nbytes), dtype=np.uint8)
    data[:count] = 0
    data[count : 2 * count] = 0xFF
    edges = np.array([0.0, -0.0, 2.0**-24, -(2.0**-24), 65504.0, -65504.0, np.inf, -np.inf, np.nan, 1.0],
                     dtype=np.float16).view(np.uint8).reshape(-1, 2)
    for i, edge in enumerate(edges):
        rows = data[(2 + i) * count : (3 + i) * count]
        for start in range(0, nbytes - 1, 2):  # every aligned pair of bytes: every float16 field of every layout
            rows[:, start : start + 2] = edge
    return data.reshape(-1, count * nbytes)


@pytest.mark.parametrize("fmt", sorted(GGUF_TYPES))
def test_every_type_dequantizes_bit_for_bit_as_gguf_py(fmt):
    import gguf

    data = _edge_blocks(fmt, np.random.default_rng(sorted(GGUF_TYPES).index(fmt)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf * 0 in gguf-py's numpy
        expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[fmt.upper()]).reshape(data.shape[0], -1)
    got = dequantize(torch.from_numpy(data.copy()), fmt).numpy()
    assert got.dtype == np.float32 and got.shape == expected.shape
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])
    assert row_bytes(fmt, got.shape[1]) == data.shape[1]


def test_a_row_that_is_not_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="cannot be cut into q4_k blocks of 256"):
        row_bytes("q4_k", 288)
    with pytest.raises(ValueError, match="a q6_k matrix is uint8 \\[out, a multiple of 210 bytes\\]"):
        dequantize(torch.zeros(2, 200, dtype=torch.uint8), "q6_k")


@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "f16", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quant_linear_and_embedding_compute_on_the_dequantized_weights(fmt, rows, monkeypatch):
    """Without the kernels, decode steps (few rows) and prefill (many) alike: the weight dequantized, then torch's
    matmul."""
    monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
    blocks = random_blocks(fmt.upper(), 48, 512, np.random.default_rng(rows))
    data = torch.from_numpy(blocks.view(np.uint8).reshape(48, -1).copy())  # float16 values as their bytes
    linear = QuantLinear(data, fmt, bias=torch.randn(48))
    assert not linear.decodes_on_kernel()
    x = torch.randn(rows, 512)
    weight = dequantize(data, fmt)
    assert torch.allclose(linear(x), F.linear(x, weight) + linear.bias, atol=1e-5, rtol=1e-5)
    embedding = QuantEmbedding(data, fmt)
    ids = torch.tensor([[3, 0], [47, 3]])
    assert torch.equal(embedding(ids), weight[ids])


# ---- the decode kernels ----------------------------------------------------------------------------------------------
DECODE_FORMATS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "f16", "bf16"]
IN_FEATURES = {"q5_0": 800, "q5_1": 800, "f16": 808, "bf16": 808}
"""Rows whose tails the SIMD loops take apart (q5: 25 blocks, eight at a time; half types: 12 x 64 + 40)."""


def _kernel_linear(x, data, fmt, bias=None, isa=None):
    return (kernel_gguf_linear if fmt in GGUF_FORMAT_IDS else kernel_kquant_linear)(x, data, fmt, bias, isa)


@pytest.mark.parametrize("isa", available_isas() or ["none"])
@pytest.mark.parametrize("fmt", DECODE_FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_decode_kernels_compute_their_reference_arithmetic_on_every_path(isa, fmt, rows):
    """The k-quants on Q8_K activations (integer products per 16 or 32 weights, float scales), q5_0 and q5_1 on Q8_0
    blocks of 32, f16 and bf16 on the float32 activations: each path against the float64 reference of the same
    arithmetic (up to float32 rounding of the sums), and near the float product; a QuantLinear's decode step is the
    kernel's, its prefill the dequantized weight's."""
    if load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    torch.manual_seed(rows)
    features = IN_FEATURES.get(fmt, 768)
    blocks = random_blocks(fmt.upper(), 40, features, np.random.default_rng(rows))
    data = torch.from_numpy(blocks.view(np.uint8).reshape(40, -1).copy())
    x = torch.randn(rows, features) * torch.logspace(-1, 1, features)
    x[0, :256] = 0  # blocks of zeros: scale 0
    bias = torch.randn(40)
    got = _kernel_linear(x, data, fmt, bias, isa)
    expected = reference_decode_linear(x, data, fmt, bias)
    magnitude = x.abs().double() @ dequantize(data, fmt).abs().double().T
    assert got.dtype == torch.float32 and got.shape == (rows, 40)
    error = (got.double() - expected).abs()
    assert bool((error <= 1e-5 * magnitude + 1e-6).all()), error.max()
    exact = F.linear(x, dequantize(data, fmt), bias)
    assert bool(((got - exact).abs() <= 0.02 * magnitude.float() + 1e-5).all())  # int8 activations' rounding
    if isa == quant_isa():  # a decode step of a QuantLinear runs there; prefill dequantizes
        linear = QuantLinear(data, fmt, bias)
        assert torch.equal(linear(x), got)
        prefill = torch.randn(40, features)
        assert torch.allclose(linear(prefill), F.linear(prefill, dequantize(data, fmt), bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", available_isas() or ["none"])
@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k", "q5_0", "q5_1"])
@pytest.mark.parametrize("batch", [3, 9])  # VNNI's tiles take up to 4 rows at once: 9 = 4 + 4 + 1
def test_tiles_of_16_rows_compute_what_their_rows_do(isa, fmt, batch, monkeypatch):
    """q4_k_x16, q5_k_x16, q6_k_x16, q5_0_x16 and q5_1_x16 hold the same bytes rearranged (and back again exactly);
    each path computes on them the reference of the rows they came from. A stage's layers of these types take them
    where the kernel runs on VNNI: decode steps on the tiles, prefill on the rows gathered back and dequantized."""
    if load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    data = torch.from_numpy(random_blocks(fmt.upper(), 48, 768, np.random.default_rng(4)).copy())
    tiles, tiled = kernel_kquant_interleave(data, fmt)
    assert tiled == f"{fmt}_x16" and tiles.shape == data.shape and not torch.equal(tiles, data)
    back, name = kernel_kquant_interleave(tiles, tiled, inverse=True)
    assert name == fmt and torch.equal(back, data)
    assert torch.equal(kernel_kquant_rows(tiles, torch.tensor([5, 0, 47, 16]), tiled), data[[5, 0, 47, 16]])
    x = torch.randn(batch, 768) * torch.logspace(-1, 1, 768)
    x[0, :256] = 0
    bias = torch.randn(48)
    got = _kernel_linear(x, tiles, tiled, bias, isa)
    magnitude = x.abs().double() @ dequantize(data, fmt).abs().double().T
    error = (got.double() - reference_decode_linear(x, data, fmt, bias)).abs()
    assert bool((error <= 1e-5 * magnitude + 1e-6).all())
    with pytest.raises(ValueError, match=f"a {tiled} matrix has a multiple of 16 rows, got 40"):
        _kernel_linear(x, tiles[:40], tiled, isa=isa)
    if isa != "avx512_vnni":
        return
    monkeypatch.setenv("CHATLOOP_ISA", isa)
    stage = torch.nn.Sequential(QuantLinear(data.clone(), fmt, bias), QuantLinear(data[:40].clone(), fmt))
    assert quant_modules.interleave_for_kernel(stage) == 1  # 40 rows are not tiles of 16: kept as rows
    assert stage[0].fmt == tiled and torch.equal(stage[0].weight, tiles) and stage[1].fmt == fmt
    assert torch.equal(stage[0](x), got)
    prefill = torch.randn(40, 768)
    assert torch.allclose(stage[0](prefill), F.linear(prefill, dequantize(data, fmt), bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", available_isas() or ["none"])
@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_x16", "q5_k_x16", "q6_k_x16"])
def test_the_kquant_kernels_take_any_number_of_activation_rows(isa, fmt):
    """On VNNI each pass over a weight row (or a tile of 16) takes up to 4 activation rows, decoding the weights once
    for them: every batch of 1 to 16 rows (whole passes and remainders of 1, 2, 3) computes each row's reference,
    and each row gets what it gets alone, bit for bit."""
    if load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    rows_fmt = fmt.removesuffix("_x16")
    data = torch.from_numpy(random_blocks(rows_fmt.upper(), 48, 768, np.random.default_rng(7)).copy())
    weight = kernel_kquant_interleave(data, rows_fmt)[0] if fmt.endswith("_x16") else data
    torch.manual_seed(7)
    x = torch.randn(16, 768) * torch.logspace(-1, 1, 768)
    x[1, :256] = 0  # a block of zeros: scale 0
    bias = torch.randn(48)
    alone = torch.cat([kernel_kquant_linear(x[b : b + 1], weight, fmt, bias, isa) for b in range(16)])
    expected = reference_decode_linear(x, data, rows_fmt, bias)
    magnitude = x.abs().double() @ dequantize(data, rows_fmt).abs().double().T
    assert bool(((alone.double() - expected).abs() <= 1e-5 * magnitude + 1e-6).all())
    for batch in range(1, 17):
        got = kernel_kquant_linear(x[:batch], weight, fmt, bias, isa)
        assert torch.equal(got, alone[:batch]), batch


def test_the_kquant_kernel_computes_every_call_afresh():
    """Each call reads its activations as they are now (the same tensor changed in place gives a new product), and
    the library is built and loaded once."""
    if load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    assert load_quant_kernels() is load_quant_kernels()
    data = torch.from_numpy(random_blocks("Q4_K", 8, 256, np.random.default_rng(0)).copy())
    x = torch.randn(1, 256)
    first = kernel_kquant_linear(x, data, "q4_k")
    x.mul_(2)
    assert torch.allclose(kernel_kquant_linear(x, data, "q4_k"), 2 * first, rtol=1e-5, atol=1e-6)


def test_the_kquant_kernel_refuses_what_it_cannot_read():
    if load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    data = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="format 'q5_0' is not one of q4_k, q6_k, q5_k, q3_k, q2_k"):
        kernel_kquant_linear(torch.zeros(1, 256), data, "q5_0")
    with pytest.raises(ValueError, match="a q4_k matrix of 512 inputs is contiguous uint8 \\[out, 288\\]"):
        kernel_kquant_linear(torch.zeros(1, 512), data, "q4_k")
    with pytest.raises(ValueError, match="format 'q4_k' is not one of q5_0, q5_1, f16, bf16"):
        kernel_gguf_linear(torch.zeros(1, 256), data, "q4_k")
    with pytest.raises(ValueError, match="a q5_1 matrix of 64 inputs is contiguous uint8 \\[out, 48\\]"):
        kernel_gguf_linear(torch.zeros(1, 64), data, "q5_1")


# ---- files ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """A tiny Llama GGUF file whose matrices take every type, split in two."""
    folder = tmp_path_factory.mktemp("every_type")
    types = write_tiny_llama(folder / "tiny.gguf")
    manifest = split_model(folder / "tiny.gguf", folder / "parts", 2, progress=False)
    return folder, types, manifest


def test_a_file_of_every_type_is_split_as_its_bytes(every_type):
    import gguf

    folder, types, manifest = every_type
    assert set(types.values()) == set(TYPE_CYCLE)
    reader = gguf.GGUFReader(folder / "tiny.gguf")
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    q4_0_blocks = sum(int(t.n_elements) // 32 for t in reader.tensors if t.tensor_type.name == "Q4_0")
    assert manifest.quantization == "gguf"
    # Every tensor as the file holds it; Q4_0 becomes Q4_1, 2 bytes more a block (the partitions' headers aside).
    tensor_bytes = 0
    formats = {}
    for info in manifest.partitions:
        with safe_open(folder / "parts" / info.file, framework="pt") as f:
            formats |= json.loads(f.metadata()[QUANTIZED_KEY])
            names = f.keys()  # safe_open is not iterable itself
            tensor_bytes += sum(f.get_slice(k).get_shape()[0] * np.prod(f.get_slice(k).get_shape()[1:]) *
                                (1 if k in formats else 4) for k in names)
    assert tensor_bytes == file_bytes + 2 * q4_0_blocks
    expected = {"Q4_0": "q4_1", "F32": None} | {t: t.lower() for t in KEPT if t != "Q4_0"}
    assert formats["model.embed_tokens.weight"] == expected[types["token_embd.weight"]]
    assert formats["model.layers.0.self_attn.q_proj.weight"] == expected[types["blk.0.attn_q.weight"]]
    assert formats["lm_head.weight"] == expected[types["output.weight"]]
    assert "model.layers.1.mlp.gate_proj.weight" not in formats  # F32: a float tensor as before
    assert set(formats.values()) == {v for v in expected.values() if v}


def test_split_tensors_dequantize_to_what_transformers_reads(every_type):
    """The query and key rows come back in Hugging Face's order on the bytes as transformers puts them back on the
    dequantized weights."""
    from transformers import AutoModelForCausalLM

    folder, _, manifest = every_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf", dtype=torch.float32)
    state = reference.state_dict()
    checked = 0
    for info in manifest.partitions:
        with safe_open(folder / "parts" / info.file, framework="pt") as f:
            formats = json.loads(f.metadata()[QUANTIZED_KEY])
            names = f.keys()  # safe_open is not iterable itself
            for key in names:
                tensor = f.get_tensor(key)
                value = dequantize(tensor, formats[key]) if key in formats else tensor
                assert torch.equal(value, state[key]), key
                checked += 1
    assert checked == len(state)  # every tensor once: the head is not tied


@pytest.mark.parametrize("kernels", [True, False])
def test_stages_of_every_type_compute_what_transformers_computes_on_the_file(every_type, kernels, load_pipeline,
                                                                             monkeypatch):
    """transformers dequantizes the whole file (gguf-py) into a float model; ChatLoop's stages keep the blocks.
    Without the kernel (float activations) they agree to float32 rounding; with it, the decode steps of the
    quantized layers (all but F16, BF16 and F32) quantize activations to int8 blocks, which moves the logits by a few
    percent of the largest."""
    from transformers import AutoModelForCausalLM

    if kernels and load_quant_kernels() is None:
        pytest.skip("the quantized kernels cannot be built here")
    if not kernels:
        monkeypatch.setattr(quant_modules, "load_quant_kernels", lambda: None)
    folder, _, _ = every_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf", dtype=torch.float32)
    pipeline = load_pipeline(folder / "parts", pack_weights=True, block_size=4, num_blocks=64)
    prompts = [[1, 17, 99, 3, 42, 8, 260, 77, 12], [1, 31, 4]]
    continuations = [[11, 23, 5, 60, 2, 90], [7, 7, 120, 3, 18, 44]]
    with torch.no_grad():
        scale = reference(torch.tensor([prompts[0] + continuations[0]])).logits.abs().max().item()
    check_against_reference(pipeline, reference, prompts, continuations, tolerance=0.05 * scale if kernels else 1e-4)


def test_a_tied_embedding_is_kept_once_a_partition(tmp_path):
    write_tiny_llama(tmp_path / "tied.gguf", types=["Q6_K"], tied=True)
    manifest = split_model(tmp_path / "tied.gguf", tmp_path / "parts", 2, progress=False)
    for info in manifest.partitions:
        with safe_open(tmp_path / "parts" / info.file, framework="pt") as f:
            assert json.loads(f.metadata()[QUANTIZED_KEY])["model.embed_tokens.weight"] == "q6_k"
            names = f.keys()  # safe_open is not iterable itself
            assert "lm_head.weight" not in names


@pytest.mark.parametrize("kind", ["IQ4_NL", "TQ2_0"])
def test_other_types_are_refused_naming_the_tensor_and_what_is_read(kind, tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    write_tiny_llama(path, types=["Q4_K"])
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "mixed.gguf", "llama")
    for field in reader.fields.values():  # the same metadata
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    qtype = gguf.GGMLQuantizationType[kind]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            writer.add_tensor(t.name, np.zeros((rows, cols // block * nbytes), dtype=np.uint8), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"tensor blk.1.ffn_up.weight is {kind}; ChatLoop reads Q4_0, .*Q6_K, F32, "
                                         "F16, BF16 tensors"):
        split_model(tmp_path / "mixed.gguf", tmp_path / "parts", 2, progress=False)
