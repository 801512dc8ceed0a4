"""Micro-benchmarks: one stage's decode step, one RPC hop, the sampler, the splitter.

    python -m pytest benchmarks --benchmark-only                     # make bench
    python -m pytest benchmarks --benchmark-only -k decode --benchmark-json decode.json

Each benchmark puts what it needs to be read into ``extra_info`` (weight bytes and the
fraction of the memory-bandwidth roofline for decode steps, the per-hop cost for RPC, MB/s
for the splitter); ``--benchmark-json`` keeps it.
"""

from __future__ import annotations

import pytest
import torch

CONTEXT = 64  # tokens already cached when the measured decode step runs


def _median(benchmark) -> float | None:
    """The median time in seconds; None with --benchmark-disable (the function ran once, untimed)."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


# ---- a stage's decode step ------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("which", ["middle", "last", "full"])
def test_stage_decode_step(benchmark, note, smollm2_partitions, bandwidth_gbs, which, batch):
    """One decode step (1 new token per sequence, 64 cached) of a SmolLM2 stage, float32.

    middle: stage 1 of 4 (layers 8-15); last: stage 3 of 4 (layers 23-29, norm, head: logits);
    full: the whole model as one stage. Linear layers prepared as the workers do (``worker.pack_weights``).
    """
    from benchmarks.roofline import decode_step
    from chatloop.models.packing import pack_linear_weights
    from chatloop.partition import load_stage

    directory, index = (
        (smollm2_partitions(1), 0) if which == "full" else (smollm2_partitions(4), 1 if which == "middle" else 3)
    )
    stage = load_stage(directory, index)
    weights = sum(p.numel() * p.element_size() for p in stage.parameters())  # counted before packing hides them
    if stage.is_first and not stage.is_last:
        weights -= stage.args.vocab_size * stage.args.hidden_size * 4  # an embedding lookup reads one row
    pack_linear_weights(stage)
    benchmark(decode_step(stage, batch, CONTEXT))
    median = _median(benchmark)
    if median is None:
        return
    benchmark.extra_info.update(
        layers=str(stage.layers_range),
        batch=batch,
        weight_bytes=weights,
        tokens_per_s=round(batch / median, 1),
        threads=torch.get_num_threads(),
    )
    if batch == 1:  # a batch-1 step reads every weight once: it cannot beat weight bytes / bandwidth
        roofline = weights / (bandwidth_gbs * 1e9)
        benchmark.extra_info.update(
            bandwidth_gbs=round(bandwidth_gbs, 2),
            roofline_ms=round(roofline * 1e3, 3),
            fraction_of_roofline=round(roofline / median, 3),
        )
    note(benchmark)


# ---- one hop: the pipeline's link, and torch RPC -------------------------------------------------------
@pytest.fixture(scope="module", params=["link", "rpc"])
def echo(request):
    """Another process that sends everything back: over the pipeline's links, or torch RPC's ``rpc_async``."""
    from benchmarks.rpc_hop import EchoGroup, LinkEcho

    made = LinkEcho() if request.param == "link" else EchoGroup()
    yield made
    made.close()


@pytest.mark.parametrize("shape", [(1, 1, 576), (16, 1, 576), (1, 1, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_round_trip(benchmark, note, echo, shape):
    """A float32 hidden state to another process and back (two hops)."""
    x = torch.randn(shape)
    out = benchmark(echo.round_trip, x)
    assert torch.equal(out, x)
    if _median(benchmark) is not None:
        benchmark.extra_info.update(bytes=x.numel() * 4, per_hop_ms=round(_median(benchmark) / 2 * 1e3, 4))
        note(benchmark)


# ---- sampling -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["greedy", "top_k_top_p", "repetition_penalty"])
def test_sampling(benchmark, kind):
    """The last stage's sampler on 16 rows of SmolLM2's 49152-token vocabulary."""
    from chatloop.engine.sampling import SamplerInput, sample

    torch.manual_seed(0)
    logits = torch.randn(16, 49152)
    history = tuple(range(1000, 1200))
    params = {
        "greedy": lambda b: SamplerInput(0.0, 0, 1.0, 1.0, b, 0),
        "top_k_top_p": lambda b: SamplerInput(0.8, 50, 0.95, 1.0, b, 0),
        "repetition_penalty": lambda b: SamplerInput(0.8, 0, 1.0, 1.1, b, 0, history),
    }[kind]
    inputs = [params(b) for b in range(16)]
    tokens = benchmark(sample, logits, inputs)
    assert len(tokens) == 16


# ---- the splitter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_splitter(benchmark, note, model, tiny_random_checkpoint, tmp_path):
    """Split into 4 partitions: a tiny random checkpoint (17 MB) and SmolLM2-135M (540 MB, float32)."""
    from chatloop.embedded import embedded_checkpoint
    from chatloop.partition import split_model

    source = tiny_random_checkpoint if model == "tiny" else embedded_checkpoint("smollm2")
    out = tmp_path / "parts"
    manifest = benchmark.pedantic(
        split_model,
        args=(source, out, 4),
        kwargs={"progress": False},
        rounds=5 if model == "tiny" else 3,
        iterations=1,
        warmup_rounds=1,
    )
    if _median(benchmark) is not None:
        total = sum(p.num_bytes for p in manifest.partitions)
        benchmark.extra_info.update(bytes_written=total, mb_per_s=round(total / _median(benchmark) / 1e6, 1))
        note(benchmark)
