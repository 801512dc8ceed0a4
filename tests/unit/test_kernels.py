"""ChatLoop's native small-batch linear kernel: same results as torch, every shape, and a clear fallback."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatloop import kernels
from chatloop.kernels import (
    BF16_ISAS,
    BF16_KERNEL_ROWS,
    MAX_KERNEL_ROWS,
    available_bf16_isas,
    kernel_bf16_linear,
    kernel_linear,
    load_kernels,
)
from chatloop.models import packing
from chatloop.models.packing import KernelLinear, PackedLinear, fast_linear_for


@pytest.fixture
def kernel():
    reason = kernels._unavailable_reason()
    if reason and "compiler" not in reason:  # a missing compiler is a fault of the machine, the rest is the CPU's
        pytest.skip(reason)
    library = load_kernels()
    assert library is not None, "the kernel did not build: see the log"
    return library


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """load_kernels() decides again, building into an empty cache."""
    monkeypatch.setenv("CHATLOOP_CACHE", str(tmp_path))
    load_kernels.cache_clear()
    yield
    load_kernels.cache_clear()


@pytest.mark.parametrize("out_features,in_features", [(576, 576), (17, 64), (5, 13), (8, 7), (1, 8)])
def test_kernel_matches_torch_for_every_row_count(kernel, out_features, in_features):
    g = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    for rows in range(MAX_KERNEL_ROWS + 2):  # tiles of 3, 2 and 1 rows, and tails of 4 output rows
        x = torch.randn(rows, in_features, generator=g)
        torch.testing.assert_close(kernel_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(kernel_linear(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-5)


def test_kernel_takes_any_leading_shape_and_strided_inputs(kernel):
    weight = torch.randn(48, 64)
    x = torch.randn(2, 3, 128)[..., ::2]  # [2, 3, 64], not contiguous
    out = kernel_linear(x, weight)
    assert out.shape == (2, 3, 48)
    torch.testing.assert_close(out, x @ weight.T, atol=1e-4, rtol=1e-5)


def test_kernel_linear_hands_larger_matmuls_to_torch(kernel, monkeypatch):
    linear = torch.nn.Linear(64, 32)
    layer = KernelLinear(linear.weight, linear.bias)
    assert layer.weight.data_ptr() != linear.weight.data_ptr()  # memory of its own, off any file mapping
    calls = []
    monkeypatch.setattr("chatloop.models.packing.kernel_linear",
                        lambda *a: calls.append(a[0].shape) or kernel_linear(*a))
    with torch.inference_mode():
        for rows in (1, MAX_KERNEL_ROWS, MAX_KERNEL_ROWS + 1, 300):
            x = torch.randn(rows, 1, 64)
            torch.testing.assert_close(layer(x), linear(x), atol=1e-4, rtol=1e-5)
    assert calls == [(1, 1, 64), (MAX_KERNEL_ROWS, 1, 64)]


def test_fast_linear_choice(kernel):
    assert fast_linear_for(torch.float32) is KernelLinear
    assert fast_linear_for(torch.float32, use_kernel=False) is PackedLinear
    assert fast_linear_for(torch.bfloat16) is (KernelLinear if len(available_bf16_isas()) > 1 else None)
    assert fast_linear_for(torch.bfloat16, use_kernel=False) is None
    assert fast_linear_for(torch.float16) is None


def _bf16_isas() -> list[str]:
    return [isa for isa in BF16_ISAS if isa in available_bf16_isas()]


@pytest.mark.parametrize("isa", list(BF16_ISAS))
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (17, 64), (5, 13), (9, 100)])
def test_bf16_kernel_sums_in_float32_and_rounds_once_on_every_path(isa, out_features, in_features):
    """Every path this CPU runs: float32 sums of bfloat16 products, rounded once to bfloat16 (torch's semantics;
    the order of the float32 additions differs, so within one bfloat16 step of the float64 result)."""
    if isa not in available_bf16_isas():
        pytest.skip(f"this CPU runs {available_bf16_isas()}, not {isa}")
    g = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16()
    for rows in range(1, MAX_KERNEL_ROWS + 2):  # tiles of 4 input rows and their tails; vector tails of in_features
        x = torch.randn(rows, in_features, generator=g).bfloat16()
        for b in (bias, None):
            exact = x.double() @ weight.double().T + (0 if b is None else b.double())
            out = kernel_bf16_linear(x, weight, b, isa)
            assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
            step = exact.abs().clamp_min(1e-3) * 2**-7  # one bfloat16 ulp (8 bits of mantissa)
            assert bool(((out.double() - exact).abs() <= step + 1e-5).all()), (isa, rows)


def test_bf16_paths_agree_and_torch_is_within_a_rounding(kernel):
    g = torch.Generator().manual_seed(1)
    weight, x = torch.randn(300, 4096, generator=g).bfloat16(), torch.randn(3, 4096, generator=g).bfloat16()
    outs = [kernel_bf16_linear(x, weight, None, isa) for isa in _bf16_isas()]
    for out in outs:
        torch.testing.assert_close(out.float(), F.linear(x, weight).float(), rtol=2**-7, atol=1e-2)


def test_bf16_kernel_refuses_what_it_cannot_compute(kernel):
    with pytest.raises(ValueError, match="takes bfloat16 x"):
        kernel_bf16_linear(torch.randn(1, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="takes bfloat16 x"):
        kernel_bf16_linear(torch.randn(1, 8).bfloat16(), torch.randn(4, 6).bfloat16())
    with pytest.raises(ValueError, match="bias must be a contiguous bfloat16"):
        kernel_bf16_linear(torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16(), torch.randn(4))
    with pytest.raises(ValueError, match="isa 'sse9' is not one of"):
        kernel_bf16_linear(torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16(), isa="sse9")


def test_a_bf16_kernel_linear_decodes_on_the_kernel_and_prefills_on_torch(kernel, monkeypatch):
    if len(available_bf16_isas()) < 2:
        pytest.skip("no SIMD path of the bfloat16 kernel here")
    linear = torch.nn.Linear(64, 32).bfloat16()
    layer = KernelLinear(linear.weight, linear.bias)
    calls = []
    original = packing.bf16_linear_unchecked
    monkeypatch.setattr(packing, "bf16_linear_unchecked", lambda x, *a: calls.append(x.shape) or original(x, *a))
    with torch.inference_mode():
        for rows in (1, BF16_KERNEL_ROWS, BF16_KERNEL_ROWS + 1):
            x = torch.randn(rows, 64).bfloat16()
            torch.testing.assert_close(layer(x).float(), linear(x).float(), rtol=2**-7, atol=1e-2)
        prefill = torch.randn(40, 64).bfloat16()
        assert torch.equal(layer(prefill), linear(prefill))  # prefill stays bit-equal to torch (and transformers)
    assert calls == [(1, 64), (BF16_KERNEL_ROWS, 64)]
    monkeypatch.setenv("CHATLOOP_BF16_ISA", "sse9")
    with pytest.raises(ValueError, match="CHATLOOP_BF16_ISA=sse9: this machine runs portable"):
        layer(torch.randn(1, 64).bfloat16())


def test_kernel_builds_once_per_cpu_into_the_cache(kernel, fresh_kernels, tmp_path):
    assert load_kernels() is not None
    built = list((tmp_path / "kernels").glob("chatloop_kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("*.so.tmp*"))
    load_kernels.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert load_kernels() is not None and built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


@pytest.mark.slow
def test_the_avx2_only_build_passes_the_kernel_tests_too(kernel, monkeypatch, tmp_path):
    """-march=native compiles other code where the CPU has no AVX-512: built here as for such a machine
    (x86-64-v3), the kernel, fused-step and golden tests pass on it as well."""
    if "avx512f" not in kernels._cpu_flags().split():
        pytest.skip("no AVX-512 here: the suite's own build is the AVX2-only one")
    here = Path(__file__).parent
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
         *(str(here / name) for name in ("test_kernels.py", "test_fused_decode.py", "test_golden.py")),
         "-k", "not avx2_only and not (every_gguf_type and not mixed)"],  # (GGUF's kernels: not built -march)
        cwd=here.parents[1], env={**os.environ, kernels.MARCH_ENV: "x86-64-v3"}, capture_output=True, text=True,
        timeout=280,  # inside this test's own 300 s
    )
    assert inner.returncode == 0 and " passed" in inner.stdout, inner.stdout[-3000:] + inner.stderr[-2000:]
    monkeypatch.setenv(kernels.MARCH_ENV, "x86-64-v3")
    built = kernels._build(os.environ.get("CC", "cc"))  # the inner run's library (built already: found by its hash)
    if shutil.which("objdump"):
        code = subprocess.run(["objdump", "-d", str(built)], capture_output=True, text=True, check=True).stdout
        assert "ymm" in code and "zmm" not in code, "the x86-64-v3 build holds AVX-512 code"


@pytest.mark.parametrize(
    "env,reason",
    [
        ({"CHATLOOP_KERNELS": "0"}, "CHATLOOP_KERNELS=0"),
        ({"ATEN_CPU_CAPABILITY": "default"}, "worker.enable_simd=false"),
        ({"CC": "chatloop-no-such-compiler"}, "install gcc"),
        ({"CC": "false"}, "the C compiler failed"),
        ({"CHATLOOP_KERNEL_MARCH": "no-such-cpu"}, "CHATLOOP_KERNEL_MARCH=no-such-cpu: unset it, or name a -march"),
    ],
)
def test_without_the_kernel_layers_fall_back_to_onednn_and_say_why(fresh_kernels, monkeypatch, caplog, env, reason):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO, logger="chatloop.kernels"):
        assert load_kernels() is None
    assert reason in caplog.text and "linear layers use torch's kernels" in caplog.text
    assert fast_linear_for(torch.float32) is PackedLinear


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(6, 2, 64, 16), (4, 4, 12, 5), (8, 1, 128, 8)])
def test_decode_attention_matches_sdpa_over_the_gathered_context(kernel, heads, kv_heads, head_dim, block_size,
                                                                 cache_dtype):
    """Grouped and plain heads, head dims with and without a vector tail, blocks shorter than 8, ragged lengths; a
    bfloat16 cache read as the float32 values it holds."""
    g = torch.Generator().manual_seed(head_dim)
    lengths = torch.tensor([1, 7, 33, 2 * block_size])
    blocks = -(-int(lengths.max()) // block_size)
    keys = torch.randn(len(lengths) * blocks * block_size + block_size, kv_heads, head_dim, generator=g)
    values = torch.randn(keys.shape, generator=g)
    keys, values = keys.to(cache_dtype), values.to(cache_dtype)
    tables = torch.randperm(len(lengths) * blocks + 1, generator=g)[: len(lengths) * blocks].view(len(lengths), blocks)
    q = torch.randn(len(lengths), heads, head_dim, generator=g)

    out = kernels.kernel_decode_attention(q, keys, values, tables, block_size, lengths, int(lengths.max()))

    def gathered(pool):  # [B, S, K, D]: each sequence's blocks in order
        return pool.view(-1, block_size, kv_heads, head_dim)[tables].view(len(lengths), -1, kv_heads, head_dim)

    visible = torch.arange(blocks * block_size)[None, :] < lengths[:, None]
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q[:, :, None], gathered(keys.float()).transpose(1, 2), gathered(values.float()).transpose(1, 2),
        attn_mask=mask, enable_gqa=True,
    )[:, :, 0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(6, 2, 64, 16), (4, 4, 12, 5)])
def test_decode_attention_in_a_window_reads_only_the_window(kernel, heads, kv_heads, head_dim, block_size,
                                                            cache_dtype):
    """``starts`` (a sliding window): each row attends to positions starts..length-1 as SDPA with the window's mask
    does, and reads nothing before its start (those slots hold NaN, and their blocks may be named twice)."""
    g = torch.Generator().manual_seed(head_dim + 1)
    lengths = torch.tensor([1, 7, 33, 3 * block_size + 2])
    starts = torch.tensor([0, 4, 33 - 9, block_size + 1])  # mid-block starts, a whole block skipped, none
    blocks = -(-int(lengths.max()) // block_size)
    keys = torch.randn(len(lengths) * blocks * block_size + block_size, kv_heads, head_dim, generator=g)
    values = torch.randn(keys.shape, generator=g)
    tables = torch.randperm(len(lengths) * blocks + 1, generator=g)[: len(lengths) * blocks].view(len(lengths), blocks)
    q = torch.randn(len(lengths), heads, head_dim, generator=g)
    slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(len(lengths), -1)  # [B, positions]
    out_of_window = torch.arange(slots.shape[1])[None, :] < starts[:, None]
    poisoned_k, poisoned_v = keys.clone(), values.clone()
    poisoned_k[slots[out_of_window]] = float("nan")
    poisoned_v[slots[out_of_window]] = float("nan")
    poisoned_tables = tables.clone()
    poisoned_tables[3, 0] = tables[3, 1]  # a block given up names a live one (as the coordinator's tables do)

    out = kernels.kernel_decode_attention(q, poisoned_k.to(cache_dtype), poisoned_v.to(cache_dtype), poisoned_tables,
                                          block_size, lengths, int(lengths.max()), starts)

    def gathered(pool):  # [B, S, K, D]: each sequence's blocks in order
        return pool.view(-1, block_size, kv_heads, head_dim)[tables].view(len(lengths), -1, kv_heads, head_dim)

    position = torch.arange(blocks * block_size)[None, :]
    visible = (position < lengths[:, None]) & (position >= starts[:, None])
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q[:, :, None], gathered(keys.to(cache_dtype).float()).transpose(1, 2),
        gathered(values.to(cache_dtype).float()).transpose(1, 2), attn_mask=mask, enable_gqa=True,
    )[:, :, 0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    whole = kernels.kernel_decode_attention(q, keys, values, tables, block_size, lengths, int(lengths.max()))
    assert (whole[1:] - expected[1:]).abs().max() > 1e-3  # (the window changes what rows 1-3 see)


def test_decode_attention_is_used_only_for_short_steps_of_float32_or_bfloat16_caches():
    from chatloop.models import LayerRange, StepBatch, build_stage
    from chatloop.models.kv_cache import IN_PLACE_MAX_TOKENS
    from tests.conftest import tiny_hf_config

    stage = build_stage(tiny_hf_config("llama").to_dict(), LayerRange(0, 1), True, False)
    stage.native_attention = load_kernels() is not None
    cache = stage.new_cache(16, 4)
    assert cache.native_attention == stage.native_attention
    long = IN_PLACE_MAX_TOKENS + 1  # a prefill longer than a verify step: torch's SDPA over the gathered context
    cache.begin(StepBatch.build([0, 0], [long, 2], [[0, 1, 2, 3, 4], [5]], 4))
    assert not cache.decode_in_place
    cache.begin(StepBatch.build([0, 0], [3, 2], [[0], [1]], 4))  # a short step (a verify's k+1 tokens) attends in place
    assert cache.decode_in_place == stage.native_attention
    cache.begin(StepBatch.build([3, 2], [1, 1], [[0], [1]], 4))
    assert cache.decode_in_place == stage.native_attention
    assert stage.new_cache(8, 4, dtype=torch.bfloat16).native_attention == stage.native_attention
    assert not stage.new_cache(8, 4, dtype=torch.float16).native_attention


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kernel_linear(torch.ones(2, 8, dtype=torch.float64), torch.ones(4, 8)),
         "takes float32, got x torch.float64"),
        (lambda: kernel_linear(torch.ones(2, 8), torch.ones(8, 4).t()), "contiguous \\[out, in\\] matrix"),
        (lambda: kernel_linear(torch.ones(2, 7), torch.ones(4, 8)), "x has 7 features, the weight takes 8"),
        (lambda: kernel_linear(torch.ones(2, 8), torch.ones(4, 8), torch.ones(3)),
         "bias must be a contiguous float32 \\[4\\]"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 2, 8), torch.ones(16, 2, 8), torch.zeros(2, 4, dtype=torch.int32), 4,
            torch.ones(2, dtype=torch.int64), 1), "tables and lengths must be int64"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 2, 8).half(), torch.ones(16, 2, 8).half(),
            torch.zeros(2, 4, dtype=torch.int64), 4, torch.ones(2, dtype=torch.int64), 1),
         "float32 or bfloat16 keys and values, got q torch.float32, keys torch.float16"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 3, 8), torch.ones(16, 3, 8), torch.zeros(2, 4, dtype=torch.int64), 4,
            torch.ones(2, dtype=torch.int64), 1), "4 query heads are not a multiple of 3 kv heads"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 2, 8), torch.ones(16, 2, 8), torch.zeros(3, 4, dtype=torch.int64), 4,
            torch.ones(2, dtype=torch.int64), 1), "need tables \\[2, N\\] and lengths \\[2\\]"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 2, 8), torch.ones(16, 2, 8), torch.zeros(2, 4, dtype=torch.int64), 4,
            torch.ones(2, dtype=torch.int64), 17), "max_length 17 is not within the tables' 16 slots"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 2, 8), torch.ones(16, 2, 8), torch.zeros(2, 4, dtype=torch.int64), 4,
            torch.tensor([3, 2]), 3, torch.tensor([1, 2])), "every start must be within 0..length-1"),
        (lambda: kernels.kernel_decode_attention(
            torch.ones(2, 4, 8), torch.ones(16, 2, 8), torch.ones(16, 2, 8), torch.zeros(2, 4, dtype=torch.int64), 4,
            torch.tensor([3, 2]), 3, torch.tensor([1])), "starts must be int64 \\[2\\]"),
        (lambda: kernels.stream_read(torch.ones(100)), "multiple of 4096 elements"),
    ],
)
def test_kernel_wrappers_refuse_wrong_dtypes_and_shapes_even_under_python_O(kernel, call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kernel_wrappers_say_why_the_kernels_are_missing(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CHATLOOP_KERNELS", "0")
    with pytest.raises(RuntimeError, match=r"native kernels are not available here \(CHATLOOP_KERNELS=0\)"):
        kernel_linear(torch.ones(1, 8), torch.ones(4, 8))


def test_row_kernels_match_torchs_norm_and_rotary(kernel):
    from chatloop.kernels import kernel_rms_norm, kernel_rope_
    from chatloop.models.llama import rotate

    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 96) * 4, torch.randn(96)
    torch.testing.assert_close(kernel_rms_norm(x, weight, 1e-5), F.rms_norm(x, (96,), weight, 1e-5),
                               rtol=1e-5, atol=1e-5)
    heads, kv_heads, head_dim = 4, 2, 16
    qkv = torch.randn(2, 3, (heads + 2 * kv_heads) * head_dim)
    angles = torch.rand(2, 3, 1, head_dim // 2) * 6
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos(), angles.sin()
    sin[..., : head_dim // 2].neg_()
    q = qkv[..., : heads * head_dim].reshape(2, 3, heads, head_dim)
    k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].reshape(2, 3, kv_heads, head_dim)
    expected_q, expected_k = rotate(q, cos, sin), rotate(k, cos, sin)
    untouched = qkv[..., -kv_heads * head_dim:].clone()
    kernel_rope_(qkv, cos.contiguous(), sin.contiguous(), 0, heads + kv_heads, head_dim)
    torch.testing.assert_close(qkv[..., : heads * head_dim].reshape(2, 3, heads, head_dim), expected_q)
    torch.testing.assert_close(
        qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].reshape(2, 3, kv_heads, head_dim), expected_k)
    assert torch.equal(qkv[..., -kv_heads * head_dim:], untouched)  # the values are not rotated
    with pytest.raises(ValueError, match="kernel_rope_"):
        kernel_rope_(qkv, cos.contiguous(), sin.contiguous(), 0, heads + 3 * kv_heads, head_dim)
