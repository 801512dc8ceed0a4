"""The one-call decode step (chatloop/models/fused_decode.py) computes what the stage's modules compute."""

from __future__ import annotations

import pytest
import torch
from gguf_files import TYPE_CYCLE, write_tiny_llama

from chatloop.kernels import available_isas, load_kernels, load_quant_kernels
from chatloop.models import StepBatch
from chatloop.models.llama import DecoderLayer
from chatloop.partition import load_stage, split_model

pytestmark = pytest.mark.skipif(load_kernels() is None or load_quant_kernels() is None,
                                reason="ChatLoop's native kernels cannot be built here")


def _decode(stage, fused: bool, prompts: torch.Tensor, steps: int, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``prompts`` [B, T] on the modules, then ``steps`` greedy decode steps, fused or on the modules;
    (logits of the decode steps [steps, B, V], the keys the cache holds)."""
    kernel = stage.decode_kernel
    B, T = prompts.shape
    tables = [[3 * b + 2, 3 * b, 3 * b + 1] for b in range(B)]  # interleaved, out of order: the tables matter
    cache = stage.new_cache(3 * B, 16, torch.float32)
    logits = []
    with torch.no_grad(), monkeypatch.context() as patch:
        stage.decode_kernel = None
        ids = stage(prompts, StepBatch.build([0] * B, [T] * B, tables, 16), cache).argmax(-1)[:, None]
        stage.decode_kernel = kernel if fused else None
        if fused:  # every decode step takes the one call, none a layer module (Granite's has a forward of its own)
            for layer_class in {DecoderLayer, stage.layer_class}:
                patch.setattr(layer_class, "forward", lambda *a: pytest.fail("a layer module ran a fused step"))
        for step in range(steps):
            out = stage(ids, StepBatch.build([T + step] * B, [1] * B, tables, 16), cache)
            logits.append(out)
            ids = out.argmax(-1)[:, None]
    stage.decode_kernel = kernel
    return torch.stack(logits), cache.keys.clone()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_fused_decode_step_equals_the_modules(family, quantize, batch, tiny_checkpoint, tmp_path, monkeypatch):
    split_model(tiny_checkpoint(family).path, tmp_path, 1, quantize=quantize, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    assert stage.decode_kernel is not None and stage.decode_kernel.quantized == (quantize is not None)
    prompts = torch.randint(0, 128, (batch, 7), generator=torch.Generator().manual_seed(batch))
    fused, fused_keys = _decode(stage, True, prompts, 6, monkeypatch)
    modules, module_keys = _decode(stage, False, prompts, 6, monkeypatch)
    # The same kernels in the same order; only SiLU's exp differs from torch's (by an ulp or so). Quantized
    # stages quantize activations to int8 blocks, where an ulp can move a value to the next step.
    tolerance = 1e-4 if quantize is None else 2e-3
    scale = modules.abs().max().item()
    assert (fused - modules).abs().max().item() <= tolerance * scale
    assert (fused_keys - module_keys).abs().max().item() <= tolerance * module_keys.abs().max().item()


def _verify(stage, mode: str, prompts: torch.Tensor, new: list[int], monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``prompts`` [B, T] on the modules, then one step of ``new[b]`` tokens for sequence b (a speculative
    verify step; sequences of fewer are padded): ``mode`` "fused" (the one call), "rows" (the modules, attending in
    place a row a token) or "sdpa" (the modules over a gathered context, as prefill). (Logits of every new token
    [B, max(new), V] with padding's zeroed, the keys the cache holds.)"""
    kernel = stage.decode_kernel
    B, T = prompts.shape
    tables = [[3 * b + 2, 3 * b, 3 * b + 1] for b in range(B)]
    cache = stage.new_cache(3 * B, 16, torch.float32)
    drafts = torch.randint(0, 128, (B, max(new)), generator=torch.Generator().manual_seed(sum(new)))
    with torch.no_grad(), monkeypatch.context() as patch:
        stage.decode_kernel = None
        stage(prompts, StepBatch.build([0] * B, [T] * B, tables, 16), cache)
        stage.decode_kernel = kernel if mode == "fused" else None
        if mode == "fused":  # the step takes the one call, no layer module
            patch.setattr(DecoderLayer, "forward", lambda *a: pytest.fail("a layer module ran a fused step"))
        cache.native_attention = mode != "sdpa"
        batch = StepBatch.build([T] * B, new, tables, 16)
        logits = stage(drafts, batch, cache, all_logits=True)
        assert cache.decode_in_place == (mode != "sdpa")
    stage.decode_kernel = kernel
    return logits.masked_fill(~batch.valid[..., None], 0.0), cache.keys.clone()


@pytest.mark.parametrize("quantize", [None, "int4"])
@pytest.mark.parametrize("new", [[9], [5, 1, 3]])
def test_a_verify_step_of_several_tokens_takes_the_one_call_and_equals_the_modules(quantize, new, tiny_checkpoint,
                                                                                   tmp_path, monkeypatch):
    """Several new tokens of a sequence (positions consecutive, each attending to those before it and the cache) run
    as rows of the one call, beside sequences of fewer (padded) in one micro-batch, and give the logits and keys of
    the modules over a gathered context with a causal mask."""
    split_model(tiny_checkpoint("llama").path, tmp_path, 1, quantize=quantize, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    assert stage.decode_kernel is not None
    prompts = torch.randint(0, 128, (len(new), 21), generator=torch.Generator().manual_seed(len(new)))
    sdpa, sdpa_keys = _verify(stage, "sdpa", prompts, new, monkeypatch)
    rows, rows_keys = _verify(stage, "rows", prompts, new, monkeypatch)
    fused, fused_keys = _verify(stage, "fused", prompts, new, monkeypatch)
    tolerance = 1e-4 if quantize is None else 2e-3  # as above
    scale = sdpa.abs().max().item()
    for logits, keys in ((fused, fused_keys), (rows, rows_keys)):
        assert (logits - sdpa).abs().max().item() <= tolerance * scale
        assert (keys - sdpa_keys).abs().max().item() <= tolerance * sdpa_keys.abs().max().item()
    # Each token saw the ones before it and not those after: the last token's logits differ from the first's.
    assert (fused[0, -1] - fused[0, 0]).abs().max().item() > 100 * tolerance * scale


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_granite_decodes_on_the_one_call_with_its_multipliers(quantize, tiny_checkpoint, tmp_path, monkeypatch):
    """Granite's attention multiplier (its scores' scale) and residual multiplier (each sublayer's output's) go into
    the one-call step: its logits are the modules', its float32 greedy tokens transformers', and a step that drops
    either multiplier is far from both."""
    checkpoint = tiny_checkpoint("granite")
    config = checkpoint.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert config.residual_multiplier != 1.0 and config.attention_multiplier != head_dim ** -0.5
    split_model(checkpoint.path, tmp_path, 1, quantize=quantize, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    assert stage.decode_kernel is not None and stage.decode_kernel.quantized == (quantize is not None)
    prompts = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    fused, fused_keys = _decode(stage, True, prompts, 6, monkeypatch)
    modules, module_keys = _decode(stage, False, prompts, 6, monkeypatch)
    tolerance = 1e-4 if quantize is None else 2e-3  # as for Llama above
    scale = modules.abs().max().item()
    assert (fused - modules).abs().max().item() <= tolerance * scale
    assert (fused_keys - module_keys).abs().max().item() <= tolerance * module_keys.abs().max().item()
    if quantize is None:  # the first token comes from the prefill, the next six from fused steps
        with torch.no_grad():
            expected = checkpoint.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=7,
                                                 do_sample=False, pad_token_id=0)[:, 8:]
        assert torch.equal(fused.argmax(-1).squeeze(-1).T, expected)
    for field, llama_value in (("attention_scale", 0.0), ("residual_multiplier", 1.0)):
        kept = getattr(stage.decode_kernel.shape, field)
        setattr(stage.decode_kernel.shape, field, llama_value)  # Llama's step, as before Granite took the call
        try:
            dropped, _ = _decode(stage, True, prompts, 6, monkeypatch)
        finally:
            setattr(stage.decode_kernel.shape, field, kept)
        assert (dropped - modules).abs().max().item() > 10 * tolerance * scale, field


def test_the_fused_step_is_used_only_where_every_layer_can_run_it(tiny_checkpoint, tmp_path):
    split_model(tiny_checkpoint("llama").path, tmp_path, 1, progress=False)
    assert load_stage(tmp_path, 0, pack_weights=True).decode_kernel is not None
    assert load_stage(tmp_path, 0, pack_weights=False).decode_kernel is None  # projections not fused
    assert load_stage(tmp_path, 0, pack_weights=True, native_kernels=False).decode_kernel is None
    assert load_stage(tmp_path, 0, pack_weights=True, dtype=torch.bfloat16).decode_kernel is None


def test_gpt2_stages_keep_their_modules(tiny_checkpoint, tmp_path):
    split_model(tiny_checkpoint("gpt2").path, tmp_path, 1, progress=False)
    assert load_stage(tmp_path, 0, pack_weights=True).decode_kernel is None


def test_a_wrong_input_is_refused_before_the_kernel_reads_it(tiny_checkpoint, tmp_path):
    # A stage handed 63 features of 64 (a bug upstream) says so instead of reading past the end.
    split_model(tiny_checkpoint("llama").path, tmp_path, 1, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    cache = stage.new_cache(4, 16, torch.float32)
    batch = StepBatch.build([3], [1], [[0]], 16)
    cache.begin(batch)
    cos, signed_sin = stage.layer_inputs(batch, torch.float32)
    with pytest.raises(ValueError, match=r"hidden states \[B, T, 64\].*\(1, 1, 63\)"):
        stage.decode_kernel(torch.randn(1, 1, 63), batch, cache, cos, signed_sin)


_ISAS = available_isas()
_TILED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q5_0", "Q5_1", "mixed")
"""Kinds a VNNI CPU loads in tiles of 16 rows, which the other paths read too (row by row)."""
# Each path on the layouts it loads (rows; VNNI's tiles), and for the tiled kinds the fastest path's layouts read by
# the others.
_CASES = [(kind, isa, isa) for kind in (*TYPE_CYCLE, "mixed") for isa in _ISAS] + \
         [(kind, _ISAS[-1], isa) for kind in _TILED for isa in _ISAS[:-1]]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny Llama GGUF file whose matrices all take one type (or take every type in turn: ``"mixed"``)."""
    files = {}

    def make(kind: str):
        if kind not in files:
            files[kind] = tmp_path_factory.mktemp(kind) / "tiny.gguf"
            write_tiny_llama(files[kind], types=TYPE_CYCLE if kind == "mixed" else [kind])
        return files[kind]

    return make


@pytest.mark.parametrize("kind, load_isa, run_isa", _CASES)
def test_a_fused_step_on_every_gguf_type_equals_the_modules(kind, load_isa, run_isa, gguf_file, tmp_path,
                                                            monkeypatch):
    """A partition of each type GGUF partitions keep, and one mixing them within a layer (q, k and v of three
    types: the step runs them as separate matrices), decodes in the one call what the modules decode, on every
    path of the quantized kernels."""
    split_model(gguf_file(kind), tmp_path, 1, progress=False)
    monkeypatch.setenv("CHATLOOP_ISA", load_isa)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    monkeypatch.setenv("CHATLOOP_ISA", run_isa)
    assert stage.decode_kernel is not None and stage.decode_kernel.quantized == (kind != "F32")
    attention = stage.decoder_layers()[0].self_attn
    assert hasattr(attention, "qkv_proj") == (kind != "mixed")  # the mixed file's q, k and v stay apart
    prompts = torch.randint(0, 291, (3, 7), generator=torch.Generator().manual_seed(len(kind)))
    fused, fused_keys = _decode(stage, True, prompts, 3, monkeypatch)
    modules, module_keys = _decode(stage, False, prompts, 3, monkeypatch)
    tolerance = 1e-4 if kind == "F32" else 2e-3  # as above: int8 activations, an ulp may move one a step
    assert (fused - modules).abs().max().item() <= tolerance * modules.abs().max().item()
    assert (fused_keys - module_keys).abs().max().item() <= tolerance * module_keys.abs().max().item()
