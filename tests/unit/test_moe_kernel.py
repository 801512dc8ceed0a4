"""A sparse MLP's chosen experts in one native call (chatloop/kernels/experts.c) against its modules' path.

Random quantized experts (valid random blocks of each type, as tests/unit/gguf_files.py makes them) of a small
sparse MLP (hidden 256, experts 256 wide: the k-quants' blocks are 256 weights), for every format family the call
dispatches to, in GGUF's rows and in tiles of 16 rows, on every SIMD path this CPU runs: a batch-1 decode step, a
decode step of several rows grouped by expert, and a prefill. The golden tests against transformers
(test_moe.py: the int8 / int4 splits) run the same call through whole pipelines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_files import random_blocks

from chatloop.kernels import ISAS, TILED, available_isas, kernel_interleave, kernel_kquant_interleave
from chatloop.kernels.experts import kernel_moe_experts, load_expert_kernels
from chatloop.models.moe import MoEArgs, SparseMoE
from chatloop.quant import QuantLinear
from chatloop.quant.modules import KERNEL_ROWS

pytestmark = pytest.mark.skipif(load_expert_kernels() is None, reason="ChatLoop's quantized kernels are off here")

HIDDEN, WIDTH, EXPERTS, TOP_K = 256, 256, 8, 2
QWEN3, MIXTRAL = ("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")
FORMATS = [("q4_1", "q4_1"), ("q8_0", "q8_0"), ("q4_k", "q6_k"), ("q5_0", "q5_1")]
"""(gate and up, down): qgemv.c's two, kquant.c's (a Q4_K_M file's experts: down in q6_k), ggufgemv.c's."""
SHAPES = [(1, 1), (5, 1), (2, 7)]
"""[sequences, tokens]: a batch-1 decode step, 5 rows of one decode step grouped by expert, a prefill."""


def _quantized(out_features: int, in_features: int, fmt: str, rng: np.random.Generator) -> QuantLinear:
    layer = QuantLinear(torch.from_numpy(random_blocks(fmt.upper(), out_features, in_features, rng)), fmt)
    layer.in_features = in_features
    return layer


def sparse_moe(gate_up: str, down: str, tiled: bool = False, names: tuple[str, str, str] = QWEN3,
               seed: int = 0) -> SparseMoE:
    """A sparse MLP of random quantized experts, gate and up merged as a stage merges them at load; ``tiled``:
    every matrix of a format with a layout in tiles of 16 rows in that layout (whatever the CPU: each SIMD path
    reads it)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    moe = SparseMoE(HIDDEN, MoEArgs(EXPERTS, TOP_K, WIDTH, norm_topk_prob=names == QWEN3,
                                    cast_scores=names == QWEN3), names)
    with torch.no_grad():
        moe.gate.weight.normal_(0.0, 0.5)
    for expert in moe.experts:
        gate, up, down_name = names
        setattr(expert, gate, _quantized(WIDTH, HIDDEN, gate_up, rng))
        setattr(expert, up, _quantized(WIDTH, HIDDEN, gate_up, rng))
        setattr(expert, down_name, _quantized(HIDDEN, WIDTH, down, rng))
        assert expert.fuse_gate_up()
    if tiled:
        for layer in moe.modules():
            if isinstance(layer, QuantLinear) and layer.fmt in ("q4_1", "q8_0", *TILED):
                interleave = kernel_kquant_interleave if layer.fmt in TILED else kernel_interleave
                layer.weight, layer.fmt = interleave(layer.weight, layer.fmt)
    return moe.eval()


def _expert_calls(moe: SparseMoE) -> list[int]:
    """A counter of the expert modules' forward calls (the modules' path), one element a call."""
    calls: list[int] = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("tiled", [False, True], ids=["rows", "tiles"])
@pytest.mark.parametrize("formats", FORMATS, ids=["-".join(f) for f in FORMATS])
def test_one_call_computes_what_the_modules_compute(formats, tiled, isa, monkeypatch):
    """Each expert's product is the quantized kernel's as QuantLinear calls it, SiLU, the weighting and the sums in
    the modules' order: equal to float32 rounding (SiLU's exp is C's, not torch's), and no expert module runs."""
    if isa not in available_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    monkeypatch.setenv("CHATLOOP_ISA", isa)
    moe = sparse_moe(*formats, tiled=tiled)
    calls = _expert_calls(moe)
    for shape in SHAPES:
        x = torch.randn(*shape, HIDDEN)
        with torch.inference_mode():
            moe.native = True
            native = moe(x)
            assert not calls, f"{shape}: the experts ran through their modules"
            moe.native = False
            reference = moe(x)
            assert calls, "the reference did not run the modules"
            calls.clear()
        scale = reference.abs().max().item()
        assert scale > 1e-2  # the experts' outputs are not vanishing
        torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5 * scale, msg=f"{shape}")


def test_mixtral_experts_and_its_float32_weighting():
    """Mixtral's names (w1 / w3 / w2) and weights (float32, not cast), on the default path."""
    moe = sparse_moe("q4_1", "q4_1", names=MIXTRAL)
    calls = _expert_calls(moe)
    x = torch.randn(3, 1, HIDDEN)
    with torch.inference_mode():
        native = moe(x)
        moe.native = False
        reference = moe(x)
    assert len(calls) == len(set(moe.route(x.reshape(-1, HIDDEN))[2].flatten().tolist()))
    torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_an_expert_of_more_rows_than_the_kernel_takes_runs_on_its_modules():
    """A long prefill (an expert with more than KERNEL_ROWS rows): the modules multiply, as a lone QuantLinear of
    that many rows does (dequantized weights, torch's GEMM), whatever the switch says."""
    moe = sparse_moe("q8_0", "q8_0")
    calls = _expert_calls(moe)
    x = torch.randn(1, 4 * KERNEL_ROWS * EXPERTS // TOP_K, HIDDEN)
    with torch.inference_mode():
        native = moe(x)
        ran = len(calls)
        moe.native = False
        reference = moe(x)
    assert ran > 0
    assert torch.equal(native, reference)


def test_bad_arguments_are_refused_with_what_is_wrong():
    moe = sparse_moe("q4_1", "q4_1")
    experts = [moe.experts[0], moe.experts[3]]
    gate_up = [e.gate_up.weight for e in experts]
    down = [e.down_proj.weight for e in experts]
    x, out = torch.randn(2, HIDDEN), torch.zeros(2, HIDDEN)
    counts, weights = torch.tensor([1, 1]), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="rows outside"):
        kernel_moe_experts(x, out, gate_up, down, "q4_1", "q4_1", counts, torch.tensor([0, 2]), weights)
    with pytest.raises(ValueError, match="down takes 256 inputs, gate_up gives 128"):
        kernel_moe_experts(x, out, [g[:256] for g in gate_up], down, "q4_1", "q4_1", counts, torch.tensor([0, 1]),
                           weights)
    with pytest.raises(ValueError, match="no kernel for 'q4_0'"):
        kernel_moe_experts(x, out, gate_up, down, "q4_0", "q4_1", counts, torch.tensor([0, 1]), weights)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernel_moe_experts(x.double(), out, gate_up, down, "q4_1", "q4_1", counts, torch.tensor([0, 1]), weights)
    # the same call, right: expert 0 on row 0, expert 3 on row 1, each at weight 0.5
    kernel_moe_experts(x, out, gate_up, down, "q4_1", "q4_1", counts, torch.tensor([0, 1]), weights)
    with torch.inference_mode():
        expected = torch.cat([experts[0](x[:1]), experts[1](x[1:])]) * 0.5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_decode_step_hands_the_kernel_only_the_experts_its_rows_chose(monkeypatch):
    """The one call reads the chosen experts' matrices (ascending) and no other: forward hooks cannot see it."""
    from chatloop.kernels import experts as expert_kernels

    moe = sparse_moe("q4_1", "q4_1", tiled=True)
    handed: list[tuple[list[int], list[int], list[int]]] = []
    one_call = expert_kernels.moe_experts_unchecked

    def record(x, out, gate_up, down, *args):
        handed.append((list(gate_up), list(down), list(args[2])))
        one_call(x, out, gate_up, down, *args)

    monkeypatch.setattr(expert_kernels, "moe_experts_unchecked", record)
    x = torch.randn(3, 1, HIDDEN)
    with torch.inference_mode():
        moe(x)
        chosen = moe.route(x.reshape(-1, HIDDEN))[2]
    used = sorted(set(chosen.flatten().tolist()))
    assert len(handed) == 1
    gate_up, down, counts = handed[0]
    assert gate_up == [moe.experts[e].gate_up.weight.data_ptr() for e in used]
    assert down == [moe.experts[e].down_proj.weight.data_ptr() for e in used]
    assert counts == [int((chosen == e).sum()) for e in used] and sum(counts) == 3 * TOP_K


def _expert_weights(moe: SparseMoE) -> list[torch.Tensor]:
    return [e.gate_up.weight for e in moe.experts] + [e.down_proj.weight for e in moe.experts]


@pytest.mark.parametrize("madvise_fails", [False, True], ids=["huge-pages", "madvise-fails"])
def test_the_first_native_call_stacks_the_experts_in_one_aligned_block(madvise_fails, monkeypatch, caplog):
    """The first native call moves every expert's matrices into one block starting on a 2 MiB boundary, each weight
    a view of it; the bytes and so the outputs are bit-equal to the separate matrices'. Where madvise fails the
    block is still made (on ordinary pages), and the log says why."""
    import copy
    import logging

    from chatloop.kernels import experts as expert_kernels

    if madvise_fails:
        monkeypatch.setattr(expert_kernels, "_madvise_huge", lambda address, length: "madvise refused (test)")
    moe = sparse_moe("q4_k", "q6_k", tiled=True)
    apart = copy.deepcopy(moe)
    apart.stacked = True  # keeps its matrices where they are
    before = [w.clone() for w in _expert_weights(moe)]
    x = torch.randn(1, 1, HIDDEN)
    with caplog.at_level(logging.INFO, logger=expert_kernels.__name__), torch.inference_mode():
        stacked, separate = moe(x), apart(x)
        rows = torch.randn(2, 7, HIDDEN)
        assert torch.equal(moe(rows), apart(rows))
    assert moe.stacked and torch.equal(stacked, separate)
    weights = _expert_weights(moe)
    storages = {w.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == 1, "the experts' weights are not views of one block"
    start = min(w.data_ptr() for w in weights)
    assert start % expert_kernels.HUGE_PAGE == 0
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    assert len({w.data_ptr() for w in weights}) == len(weights)  # no two matrices overlap at their starts
    assert ("madvise refused (test)" in caplog.text) == madvise_fails
    assert not any(w.is_inference() for w in weights)
