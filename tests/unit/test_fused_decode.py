"""The one-call decode step (chatloop/models/fused_decode.py) computes what the stage's modules compute."""

from __future__ import annotations

import pytest
import torch
from gguf_files import TYPE_CYCLE, write_tiny_llama

from chatloop.kernels import available_isas, load_kernels, load_quant_kernels
from chatloop.models import StepBatch
from chatloop.models.fused_decode import LlamaDecodeKernel
from chatloop.models.llama import DecoderLayer
from chatloop.models.moe import SparseMoE
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


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
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
            for layer_class in {DecoderLayer, stage.layer_class}:
                patch.setattr(layer_class, "forward", lambda *a: pytest.fail("a layer module ran a fused step"))
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


# Mixture of experts (Qwen3-MoE, Mixtral; the dense layers of a mixed one) and Qwen3's per-head q/k norms.

@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """``moe_folder(variant)``: a tiny random MoE checkpoint (tests/conftest.py's variants), written once."""
    from tests.conftest import build_tiny_moe

    made = {}

    def make(variant: str):
        if variant not in made:
            made[variant] = tmp_path_factory.mktemp(variant)
            build_tiny_moe(variant).save_pretrained(made[variant])
        return made[variant]

    return make


def _sparse_layers(stage) -> list:
    return [m for m in stage.modules() if isinstance(m, SparseMoE)]


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe-unnormed", "qwen3_moe-mixed", "mixtral"])
@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_moe_stage_decodes_in_the_one_call_as_its_modules(variant, quantize, batch, moe_folder, tmp_path,
                                                             monkeypatch):
    """Router, softmax, top-k (renormalised or not), the chosen experts and the dense layers between them in the one
    call: the modules' logits and keys, and no layer module runs a step (``_decode`` fails if one does)."""
    split_model(moe_folder(variant), tmp_path, 1, quantize=quantize, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    kernel = stage.decode_kernel
    assert kernel is not None and kernel.quantized and kernel.shape.experts == 8 and kernel.shape.top_k == 2
    assert kernel.shape.norm_topk_prob == (variant != "qwen3_moe-unnormed")
    assert sum(bool(layer.moe) for layer in kernel.layers) == len(_sparse_layers(stage)) > 0
    prompts = torch.randint(0, 128, (batch, 7), generator=torch.Generator().manual_seed(batch))
    fused, fused_keys = _decode(stage, True, prompts, 6, monkeypatch)
    modules, module_keys = _decode(stage, False, prompts, 6, monkeypatch)
    assert kernel.resumed == 0
    within_rounding(fused, fused_keys, modules, module_keys)
    # The routing matters: the experts' renormalisation flipped, every step is far from the modules'.
    kernel.shape.norm_topk_prob ^= 1
    try:
        flipped, _ = _decode(stage, True, prompts, 6, monkeypatch)
    finally:
        kernel.shape.norm_topk_prob ^= 1
    assert _token_errors(flipped, modules).median().item() > 1e-3


def _token_errors(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each token's largest logit error, relative to the reference's largest logit."""
    return (logits - reference).abs().amax(-1).flatten() / reference.abs().max().item()


def within_rounding(fused: torch.Tensor, fused_keys: torch.Tensor, modules: torch.Tensor,
                    module_keys: torch.Tensor) -> None:
    """The one call's logits and keys are the modules' to float32 rounding: the same kernels in the same order, but
    the router's matmul, softmax and SiLU round apart from torch's by an ulp or so. Most tokens agree to ~1e-7; an
    ulp can move an int8-quantized activation a step (as in Llama's quantized steps), and the few tokens downstream
    of one such move differ by up to ~1e-2 (measured: at most 8e-3 over these variants)."""
    errors = _token_errors(fused, modules)
    assert errors.median().item() <= 1e-5
    assert errors.max().item() <= 2e-2
    assert (fused_keys - module_keys).abs().max().item() <= 2e-2 * module_keys.abs().max().item()


@pytest.mark.parametrize("new", [[9], [5, 1, 3]])
def test_a_moe_verify_step_of_several_tokens_takes_the_one_call(new, moe_folder, tmp_path, monkeypatch):
    """A speculative verify step's rows (several tokens of a sequence, sequences of fewer padded) share the experts
    the call groups by expert: the logits and keys of the modules over a gathered context."""
    split_model(moe_folder("qwen3_moe"), tmp_path, 1, quantize="int4", progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    assert stage.decode_kernel is not None
    prompts = torch.randint(0, 128, (len(new), 21), generator=torch.Generator().manual_seed(len(new)))
    sdpa, sdpa_keys = _verify(stage, "sdpa", prompts, new, monkeypatch)
    fused, fused_keys = _verify(stage, "fused", prompts, new, monkeypatch)
    within_rounding(fused, fused_keys, sdpa, sdpa_keys)
    assert (fused[0, -1] - fused[0, 0]).abs().max().item() > 0.2 * sdpa.abs().max().item()


def test_a_routing_tie_finishes_the_step_on_the_modules(moe_folder, tmp_path, monkeypatch):
    """Equal router rows make every expert's probability tie; torch.topk then picks its own (not the lowest
    indices), which the call cannot reproduce: it stops at that layer and the modules finish the step, with the
    modules' logits. (Where it picked itself, the experts and so the logits would differ.)"""
    split_model(moe_folder("qwen3_moe"), tmp_path, 1, quantize="int4", progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    kernel = stage.decode_kernel
    tied = _sparse_layers(stage)[1]
    with torch.no_grad():
        tied.gate.weight.copy_(tied.gate.weight[0].expand_as(tied.gate.weight))  # in place: the kernel reads it
    assert torch.topk(torch.zeros(8), 2).indices.tolist() != [0, 1]  # what makes the test able to fail
    prompts = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    modules, module_keys = _decode(stage, False, prompts, 4, monkeypatch)
    kernel.resumed = 0
    with torch.no_grad():
        stage.decode_kernel = None
        cache = stage.new_cache(6, 16, torch.float32)
        tables = [[2, 0, 1], [5, 3, 4]]
        ids = stage(prompts, StepBatch.build([0, 0], [7, 7], tables, 16), cache).argmax(-1)[:, None]
        stage.decode_kernel = kernel
        fused = []
        for step in range(4):
            fused.append(stage(ids, StepBatch.build([7 + step] * 2, [1, 1], tables, 16), cache))
            ids = fused[-1].argmax(-1)[:, None]
    assert kernel.resumed == 4
    within_rounding(torch.stack(fused), cache.keys, modules, module_keys)


def test_moe_steps_of_more_rows_than_the_quantized_kernels_take_stay_on_the_modules(moe_folder, tmp_path):
    """Two 9-token prompts attend in place (18 rows, padding's included) but the modules multiply them on torch's
    GEMM with float activations: the call leaves such a step to them, and so gives exactly their result."""
    split_model(moe_folder("qwen3_moe-mixed"), tmp_path, 1, quantize="int4", progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    kernel = stage.decode_kernel
    prompts = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(9))
    outputs = []
    for fused in (True, False):
        stage.decode_kernel = kernel if fused else None
        cache = stage.new_cache(4, 16, torch.float32)
        with torch.no_grad():
            outputs.append(stage(prompts, StepBatch.build([0, 0], [9, 9], [[1, 0], [3, 2]], 16), cache))
        assert cache.decode_in_place
    stage.decode_kernel = kernel
    assert kernel.declined == 1 and torch.equal(*outputs)


def test_a_moe_pipeline_greedy_tokens_equal_the_modules(moe_folder, tmp_path, load_pipeline):
    """Over two stages of an int4 split, greedy decoding on the one call gives the modules' tokens."""
    split_model(moe_folder("qwen3_moe-mixed"), tmp_path, 2, quantize="int4", progress=False)
    runs = []
    for fused in (True, False):
        pipeline = load_pipeline(tmp_path, pack_weights=True, block_size=4, num_blocks=64)
        assert all(stage.decode_kernel is not None for stage in pipeline.stages)
        if not fused:
            for stage in pipeline.stages:
                stage.decode_kernel = None
        logits = pipeline.prefill([[5, 17, 99, 3, 42], [9, 31, 4, 8, 1]])
        tokens = []
        for _ in range(8):
            tokens.append(logits.argmax(-1).tolist())
            logits = pipeline.decode(tokens[-1])
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_qwen3_greedy_tokens_on_the_one_call_equal_transformers(tiny_checkpoint, tmp_path, monkeypatch):
    """Qwen3's per-head q/k norms in the call: float32 greedy tokens are transformers'."""
    checkpoint = tiny_checkpoint("qwen3")
    split_model(checkpoint.path, tmp_path, 1, progress=False)
    stage = load_stage(tmp_path, 0, pack_weights=True)
    assert stage.decode_kernel is not None and all(layer.q_norm for layer in stage.decode_kernel.layers)
    prompts = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    fused, _ = _decode(stage, True, prompts, 6, monkeypatch)
    with torch.no_grad():
        expected = checkpoint.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=7,
                                             do_sample=False, pad_token_id=0)[:, 8:]
    assert torch.equal(fused.argmax(-1).squeeze(-1).T, expected)
    # without the norms the step is another one
    norms = [(layer.q_norm, layer.k_norm) for layer in stage.decode_kernel.layers]
    for layer in stage.decode_kernel.layers:
        layer.q_norm = layer.k_norm = None
    try:
        dropped, _ = _decode(stage, True, prompts, 6, monkeypatch)
    finally:
        for layer, (q, k) in zip(stage.decode_kernel.layers, norms):
            layer.q_norm, layer.k_norm = q, k
    assert (dropped - fused).abs().max().item() > 0.1 * fused.abs().max().item()


def test_moe_and_normed_stages_keep_their_modules_where_the_call_cannot_run_them(moe_folder, tiny_checkpoint,
                                                                                 tmp_path):
    """Float experts (no expert kernel for them), the experts' switch off, bfloat16, kernels off: the modules'
    path. OLMo 2's q/k norms over the whole projection and Gemma 3's (1 + w) norms: not Qwen3's."""
    split_model(moe_folder("qwen3_moe"), tmp_path / "float", 1, progress=False)
    assert load_stage(tmp_path / "float", 0, pack_weights=True).decode_kernel is None
    split_model(moe_folder("qwen3_moe"), tmp_path / "int4", 1, quantize="int4", progress=False)
    stage = load_stage(tmp_path / "int4", 0, pack_weights=True)
    assert stage.decode_kernel is not None
    _sparse_layers(stage)[0].native = False
    assert LlamaDecodeKernel.for_stage(stage) is None
    assert load_stage(tmp_path / "int4", 0, pack_weights=True, native_kernels=False).decode_kernel is None
    assert load_stage(tmp_path / "int4", 0, pack_weights=True, dtype=torch.bfloat16).decode_kernel is None
    for family in ("olmo2", "gemma3_text"):
        split_model(tiny_checkpoint(family).path, tmp_path / family, 1, progress=False)
        assert load_stage(tmp_path / family, 0, pack_weights=True).decode_kernel is None, family


@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiles"])
def test_k_quant_experts_decode_in_the_one_call_as_their_modules(tiled, tmp_path, monkeypatch):
    """Experts as a Q4_K_M GGUF file holds them (gate/up Q4_K, down Q6_K; hidden 256, the k-quants' block), in rows or
    in the tiles of 16 rows a VNNI CPU loads: the one call gives the modules' logits."""
    import numpy as np
    from gguf_files import random_blocks
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from chatloop.kernels import kernel_kquant_interleave
    from chatloop.quant import QuantLinear
    from tests.conftest import TINY_VOCAB

    config = Qwen3MoeConfig(vocab_size=TINY_VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, intermediate_size=256, moe_intermediate_size=256,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "hf")
    split_model(tmp_path / "hf", tmp_path / "parts", 1, quantize="int4", progress=False)
    stage = load_stage(tmp_path / "parts", 0, pack_weights=True)
    rng = np.random.default_rng(0)

    def matrix(kind: str, rows: int) -> QuantLinear:
        layer = QuantLinear(torch.from_numpy(random_blocks(kind, rows, 256, rng)), kind.lower())
        layer.in_features = 256
        if tiled:
            layer.weight, layer.fmt = kernel_kquant_interleave(layer.weight, layer.fmt)
        return layer

    for moe in _sparse_layers(stage):
        with torch.no_grad():
            moe.gate.weight.normal_(0.0, 0.5)  # clear margins between the experts
        for expert in moe.experts:
            expert.gate_up, expert.down_proj = matrix("Q4_K", 512), matrix("Q6_K", 256)
        moe.stacked = False
    stage.decode_kernel = LlamaDecodeKernel.for_stage(stage)
    assert stage.decode_kernel is not None
    assert {layer.moe.contents.gate_up_format for layer in stage.decode_kernel.layers} == \
        {100 + (5 if tiled else 0)}  # kquant.c's q4_k (or q4_k_x16)
    prompts = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    fused, fused_keys = _decode(stage, True, prompts, 4, monkeypatch)
    modules, module_keys = _decode(stage, False, prompts, 4, monkeypatch)
    within_rounding(fused, fused_keys, modules, module_keys)
