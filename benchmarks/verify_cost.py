"""What a speculative verify step costs against a one-token decode step, on one stage in one process.

A verify step feeds a sequence's k drafted tokens (and the token before them) through every stage at once; its cost
over a one-token step's bounds what speculation can give. This times, on the model loaded as one stage as a worker
loads it, a step of 1 token and steps of ``k + 1`` tokens after ``--context`` cached positions, in rounds that take
every width in turn (the median of ``--steps`` steps each):

- ``one-call``: the stage's one-call native step (``chatloop/models/fused_decode.py``), each new token a row;
- ``modules``: the per-layer modules over a gathered context with SDPA's causal mask, as a verify step ran before
  the one-call step took several tokens (and as prefill runs).

    flock /tmp/chatloop-bench.lock .venv/bin/python -m benchmarks.verify_cost --model smollm2 --rounds 5
    python -m benchmarks.verify_cost --model smollm2 model.quantization=int4     # ChatLoop config overrides
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["main", "verify_step"]

BLOCK_SIZE = 16


def verify_step(stage, tokens: int, context: int, one_call: bool) -> Callable[[], torch.Tensor]:
    """A function running one step of ``tokens`` new tokens of one sequence after ``context`` cached positions, on
    the one-call step (``one_call``) or the modules with SDPA."""
    from chatloop.models import StepBatch

    def inputs(n: int) -> torch.Tensor:  # token ids for a first stage, hidden states for the others
        if stage.is_first:
            return torch.randint(256, stage.args.vocab_size, (1, n))
        return torch.randn(1, n, stage.args.hidden_size)

    blocks = math.ceil((context + tokens) / BLOCK_SIZE)
    cache = stage.new_cache(blocks, BLOCK_SIZE)
    tables = [list(range(blocks))]
    kernel = stage.decode_kernel
    with torch.inference_mode():
        stage.decode_kernel = None
        stage(inputs(context), StepBatch.build([0], [context], tables, BLOCK_SIZE), cache)
        stage.decode_kernel = kernel
    if not one_call:
        cache.native_attention = False  # (the same cache object: its in-place decision is made per step)
    step, x = StepBatch.build([context], [tokens], tables, BLOCK_SIZE), inputs(tokens)

    @torch.inference_mode()
    def run() -> torch.Tensor:
        stage.decode_kernel = kernel if one_call else None
        try:
            return stage(x, step, cache, all_logits=stage.is_last)
        finally:
            stage.decode_kernel = kernel

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ks", default="2,4,6,8", help="drafted tokens k: steps of k + 1 tokens")
    parser.add_argument("--context", type=int, default=128, help="cached positions before the step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps timed per width and round (their median)")
    parser.add_argument("--json", help="also write the figures here")
    ns, overrides = parser.parse_known_args(argv)
    if ns.rounds < 1 or ns.steps < 1:
        parser.error("--rounds and --steps must be at least 1")

    from chatloop import load_config
    from chatloop.api import partitions_dir_for, prepare_partitions
    from chatloop.partition import load_stage

    from .checkpoints import resolve_model_name

    name = resolve_model_name(ns.model, ns.dtype)
    cfg = load_config([f"model.name={name}", f"model.dtype={ns.dtype}", "cluster.num_workers=1", *overrides])
    prepare_partitions(cfg)
    stage = load_stage(partitions_dir_for(cfg), 0, dtype=getattr(torch, ns.dtype),
                       pack_weights=cfg.worker.pack_weights, native_kernels=cfg.worker.native_kernels)
    if stage.decode_kernel is None:
        raise SystemExit("this stage has no one-call decode step (another family, dtype, or native kernels off)")
    widths = [1] + [int(k) + 1 for k in ns.ks.split(",") if k]
    runs = {(w, one_call): verify_step(stage, w, ns.context, one_call) for w in widths for one_call in (True, False)
            if one_call or w > 1}
    for run in runs.values():
        run()  # warm-up
    rounds, loads = [], []
    for r in range(ns.rounds):
        entry = {}
        for key in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            times = []
            for _ in range(ns.steps):
                t = time.perf_counter()
                runs[key]()
                times.append(time.perf_counter() - t)
            entry[key] = statistics.median(times) * 1e3
        rounds.append(entry)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1} (load {loads[-1]:.2f}): " + ", ".join(
            f"{w} {'one-call' if c else 'modules'} {ms:.2f} ms" for (w, c), ms in entry.items()), flush=True)
    summary = {}
    for (w, one_call) in runs:
        name_ = f"{w}_{'one_call' if one_call else 'modules'}"
        ratios = [e[(w, one_call)] / e[(1, True)] for e in rounds]  # against the round's one-token step
        summary[name_] = {"tokens": w, "path": "one-call" if one_call else "modules",
                          "step_ms": statistics.median(e[(w, one_call)] for e in rounds),
                          "of_one_token_step": statistics.median(ratios), "ratios": ratios}
        s = summary[name_]
        print(f"{w} tokens, {s['path']}: {s['step_ms']:.2f} ms, {s['of_one_token_step']:.2f}x a one-token step")
    result = {"command": "python -m benchmarks.verify_cost " + " ".join(argv or sys.argv[1:]), "model": ns.model,
              "dtype": ns.dtype, "context": ns.context, "threads": torch.get_num_threads(),
              "load_average_by_round": loads, "summary": summary}
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
