"""Decode kernels of every GGUF type ChatLoop keeps, per byte of weights: one matrix, one row, measured in pairs.

A batch-1 decode step reads each weight once, so a kernel's figure of merit is weight bytes per second. This
command times ``x @ W.T`` for one row ``x`` and one ``out x in`` matrix of each type on each SIMD path this CPU
runs (``kernel_quant_linear`` for q4_1 and q8_0, also in the interleaved x16 layout that VNNI stages use;
``kernel_kquant_linear`` for the k-quants; ``kernel_gguf_linear`` for q5_0, q5_1, f16 and bf16; q4_k, q5_k, q6_k,
q5_0 and q5_1 also in tiles of 16 rows) in rounds: each round times every contender once (a window of calls, the order
rotated round to round), so that the machine's drift falls on all alike; the figure is the median over rounds. The
matrices (16.8 M weights: 5-34 MB) stay in this machine's L3, so these are compute figures, not DRAM streaming.
``--batch 16`` times 16 activation rows a call (a batch-16 decode step's products): GB/s is then weight bytes a
call per second, and GMAC/s counts every row's multiply-adds.

    python -m benchmarks.gguf_kernels --threads 2 --rounds 9 --json benchmarks/results/gguf-kernels/gguf-kernels.json
    python -m benchmarks.gguf_kernels --threads 1 --cpu-time      # one thread's CPU time: robust on a busy machine
    python -m benchmarks.gguf_kernels --formats q4_1,q4_k --isas avx2 --portable
    python -m benchmarks.gguf_kernels --threads 1 --cpu-time --batch 16 --formats q4_k_x16,q6_k,q6_k_x16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMATS", "measure", "random_matrix"]

FORMATS = ["q4_1", "q4_1_x16", "q8_0", "q8_0_x16", "q2_k", "q3_k", "q4_k", "q4_k_x16", "q5_k", "q5_k_x16", "q6_k",
           "q6_k_x16", "q5_0", "q5_0_x16", "q5_1", "q5_1_x16", "f16", "bf16"]
HALF_FIELDS = {"q4_1": (0, 2), "q8_0": (0,), "q5_0": (0,), "q5_1": (0, 2), "q2_k": (80, 82), "q3_k": (108,),
               "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
"""Where each block keeps its float16 scales (set to sane values: random bytes would give NaN and subnormals)."""


def random_matrix(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """A [rows, cols] matrix of ``fmt`` as uint8 rows: random quants, scales around 1e-3."""
    from chatloop.quant.blocks import block_of

    if fmt in ("f16", "bf16"):
        values = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05)
        return values.to(torch.float16 if fmt == "f16" else torch.bfloat16).view(torch.uint8).reshape(rows, -1)
    weights, nbytes = block_of(fmt)
    data = rng.integers(0, 256, size=(rows * cols // weights, nbytes), dtype=np.uint8)
    for offset in HALF_FIELDS[fmt]:
        data[:, offset : offset + 2] = (rng.uniform(0.5, 1.5, size=data.shape[0]) * 1e-3).astype(
            np.float16).view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(data.reshape(rows, -1))


def contenders(fmt: str, isa: str, rows: int, cols: int, rng: np.random.Generator, batch: int = 1):
    """(weight bytes, a function computing one product), or None where ``isa`` does not run ``fmt``."""
    from chatloop.kernels import (
        GGUF_FORMAT_IDS,
        kernel_gguf_linear,
        kernel_interleave,
        kernel_kquant_interleave,
        kernel_kquant_linear,
        kernel_quant_linear,
    )

    base = fmt.removesuffix("_x16")
    data = random_matrix(base, rows, cols, rng)
    x = torch.randn(batch, cols)
    if fmt.endswith("_x16"):
        if isa != "avx512_vnni":
            return None
        data, fmt = (kernel_interleave if base in ("q4_1", "q8_0") else kernel_kquant_interleave)(data, base)
    if base in ("q4_1", "q8_0"):
        return data.numel(), lambda: kernel_quant_linear(x, data, fmt, cols, isa=isa)
    if base in GGUF_FORMAT_IDS:
        return data.numel(), lambda: kernel_gguf_linear(x, data, fmt, isa=isa)
    return data.numel(), lambda: kernel_kquant_linear(x, data, fmt, isa=isa)


def measure(formats: list[str], isas: list[str], rows: int, cols: int, rounds: int, window: float,
            cpu_time: bool = False, batch: int = 1) -> dict:
    """Per (format, path): weight bytes and the per-call seconds of every round (``cpu_time``: of this thread's CPU
    time, which time spent preempted by other processes does not count; one thread only)."""
    clock = time.thread_time if cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    runs = {}
    for fmt in formats:
        for isa in isas:
            made = contenders(fmt, isa, rows, cols, rng, batch)
            if made is not None:
                runs[f"{fmt}/{isa}"] = made
    for _, call in runs.values():  # warm: build, first touch
        call()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            call = runs[name][1]
            calls, start = 0, clock()
            while (elapsed := clock() - start) < window or calls < 3:
                call()
                calls += 1
            times[name].append(elapsed / calls)
    return {name: {"weight_bytes": runs[name][0], "seconds": times[name]} for name in names}


def main(argv: list[str] | None = None) -> None:
    from chatloop.kernels import available_isas

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--isas", default=None, help="paths to time (default: every SIMD path this CPU runs)")
    parser.add_argument("--portable", action="store_true", help="time the portable C path too (slow)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1, help="activation rows a call (a decode step's batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--window", type=float, default=0.1, help="seconds of calls a contender a round")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time this thread's CPU time, not the wall clock (needs --threads 1): on a shared "
                             "machine, the kernel's own speed apart from time preempted")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures one thread: use --threads 1")
    torch.set_num_threads(args.threads)
    isas = args.isas.split(",") if args.isas else [i for i in available_isas() if i != "portable" or args.portable]
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: give 1 or more activation rows")
    results = measure(args.formats.split(","), isas, args.rows, args.cols, args.rounds, args.window, args.cpu_time,
                      args.batch)
    baseline = {}
    lines = [f"{'format/path':<22} {'MB':>6} {'median ms':>10} {'GB/s':>6} {'range GB/s':>12}  "
             f"/ q4_1 same path  / q4_1_x16  GMAC/s (batch {args.batch})"]
    for name, result in results.items():
        nbytes, seconds = result["weight_bytes"], result["seconds"]
        median = statistics.median(seconds)
        result["median_ms"] = median * 1e3
        result["gb_per_s"] = nbytes / median / 1e9
        result["gmac_per_s"] = args.rows * args.cols * args.batch / median / 1e9
        fmt, isa = name.split("/")
        if fmt in ("q4_1", "q4_1_x16"):
            baseline[fmt if fmt.endswith("_x16") else isa] = result["gb_per_s"]
    for name, result in results.items():
        isa = name.split("/")[1]
        ratio = result["gb_per_s"] / baseline[isa] if isa in baseline else float("nan")
        tiled = result["gb_per_s"] / baseline["q4_1_x16"] if "q4_1_x16" in baseline else float("nan")
        result["per_byte_vs_q4_1"], result["per_byte_vs_q4_1_x16"] = ratio, tiled
        lo, hi = (result["weight_bytes"] / max(result["seconds"]) / 1e9,
                  result["weight_bytes"] / min(result["seconds"]) / 1e9)
        lines.append(f"{name:<22} {result['weight_bytes'] / 1e6:>6.1f} {result['median_ms']:>10.3f} "
                     f"{result['gb_per_s']:>6.1f} {lo:>5.1f}-{hi:<6.1f}  {ratio:>16.2f}  {tiled:>9.2f}  "
                     f"{result['gmac_per_s']:>6.1f}")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": "python -m benchmarks.gguf_kernels " + " ".join(argv or sys.argv[1:]),
                  "matrix": [args.rows, args.cols], "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                  "window_s": args.window,
                  "clock": "thread CPU time" if args.cpu_time else "wall",
                  "cpu": platform.processor() or platform.machine(),
                  "load_average": os.getloadavg(), "results": results}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        args.json.with_suffix(".txt").write_text(record["command"] + "\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
