"""Batch-1 decode against the memory-bandwidth roofline, measured in pairs.

A batch-1 decode step reads every weight once, so it cannot take less than weight bytes /
read bandwidth. This VM's bandwidth drifts (21-38 GB/s within an hour here), so a bandwidth
measured at the start of a minute-long sweep job is a loose yardstick. This command pairs
them: each round measures the bandwidth (the best of torch's sum and the four-stream read,
``measure.memory_bandwidth``) and then times decode steps of the model loaded as one stage,
as the one-process mode runs it; the fraction is the median over rounds of roofline / step.

    python -m benchmarks.roofline --model random:tinyllama-1.1b --dtype float32
    python -m benchmarks.roofline --model smollm2 --rounds 5 --json roofline.json
    python -m benchmarks.roofline worker.native_kernels=false        # ChatLoop config overrides
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["decode_step", "measure_roofline"]

BLOCK_SIZE = 16


def decode_step(stage, batch: int, context: int) -> Callable[[], torch.Tensor]:
    """A function running one decode step of ``stage`` (1 new token per sequence after ``context`` cached)."""
    from chatloop.models import StepBatch

    def inputs(tokens: int) -> torch.Tensor:  # token ids for a first stage, hidden states for the others
        if stage.is_first:
            return torch.randint(256, stage.args.vocab_size, (batch, tokens))
        return torch.randn(batch, tokens, stage.args.hidden_size)

    blocks = math.ceil((context + 1) / BLOCK_SIZE)
    cache = stage.new_cache(batch * blocks, BLOCK_SIZE)
    tables = [list(range(b * blocks, (b + 1) * blocks)) for b in range(batch)]
    with torch.inference_mode():
        stage(inputs(context), StepBatch.build([0] * batch, [context] * batch, tables, BLOCK_SIZE), cache)
    step, x = StepBatch.build([context] * batch, [1] * batch, tables, BLOCK_SIZE), inputs(1)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        return stage(x, step, cache)

    return run


def measure_roofline(
    model: str, dtype: str, rounds: int, steps: int, bandwidth_mb: int, context: int, overrides: list[str] = ()
) -> dict:
    """Paired rounds of (bandwidth, median decode step); see the module docstring."""
    from chatloop import load_config
    from chatloop.api import partitions_dir_for, prepare_partitions
    from chatloop.embedded import resolve_model
    from chatloop.partition import load_stage

    from .checkpoints import resolve_model_name
    from .measure import memory_bandwidth, weight_bytes_per_token

    name = resolve_model_name(model, dtype)  # random:SHAPE is written on first use
    folder = resolve_model(name)
    cfg = load_config([f"model.name={name}", f"model.dtype={dtype}", "cluster.num_workers=1", *overrides])
    prepare_partitions(cfg)
    stage = load_stage(
        partitions_dir_for(cfg), 0, dtype=getattr(torch, dtype),
        pack_weights=cfg.worker.pack_weights, native_kernels=cfg.worker.native_kernels,
    )
    weight_bytes = weight_bytes_per_token(folder, dtype, cfg.model.quantization)
    if weight_bytes is None:
        raise ValueError("model.quantization=gguf: the roofline needs a scheme (int8, int4) whose bytes are known")
    run = decode_step(stage, 1, context)
    run()
    pairs = []
    for _ in range(rounds):
        gbs = memory_bandwidth(bandwidth_mb, repeats=3)["read_gbs"]
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        step_ms = statistics.median(times) * 1e3
        roofline_ms = weight_bytes / (gbs * 1e9) * 1e3
        pairs.append(
            {"bandwidth_gbs": gbs, "step_ms": step_ms, "roofline_ms": roofline_ms, "fraction": roofline_ms / step_ms})
    fractions = [p["fraction"] for p in pairs]
    return {
        "model": model,
        "dtype": dtype,
        "weight_bytes_per_token": weight_bytes,
        "overrides": list(overrides),
        "threads": torch.get_num_threads(),
        "fraction_median": statistics.median(fractions),
        "fraction_min": min(fractions),
        "fraction_max": max(fractions),
        "rounds": pairs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tinyllama-1.1b",
                        help="checkpoint folder, embedded model or random:SHAPE")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="decode steps per round (their median counts)")
    parser.add_argument("--bandwidth-mb", type=int, default=1024)
    parser.add_argument("--context", type=int, default=64, help="tokens cached before the measured step")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="ChatLoop config overrides, e.g. worker.native_kernels=false")
    args = parser.parse_args(argv)
    from .measure import in_temporary_thread

    result = in_temporary_thread(measure_roofline, args.model, args.dtype, args.rounds, args.steps, args.bandwidth_mb,
                                 args.context, args.overrides)
    for p in result["rounds"]:
        print(f"bandwidth {p['bandwidth_gbs']:5.1f} GB/s  roofline {p['roofline_ms']:7.2f} ms  "
              f"step {p['step_ms']:7.2f} ms  fraction {p['fraction']:.2f}")
    print(
        f"{args.model} {args.dtype} {' '.join(args.overrides)}, batch 1, "
        f"{result['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token: "
        f"{result['fraction_median']:.2f} of the roofline (median of {args.rounds} rounds, "
        f"{result['fraction_min']:.2f}-{result['fraction_max']:.2f})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
