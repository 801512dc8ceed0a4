"""One layer's decode attention past a sliding window: the attention kernel from each token's window start against
torch's gathered path (the blocks gathered, SDPA with the window's mask), in alternating rounds.

Three cases of ``PagedKVCache``: every layer windowed (Mistral: the gathered path already skips the blocks before the
window), a windowed layer beside full ones in one pool (Gemma 2/3 without prefill chunks: it gathers the whole
context and masks it) and in the windowed layers' own pool (with chunks: each sequence's window table names only the
blocks its window spans, the gathered path skips the rest). Both paths read the same cache; their outputs are
checked equal before timing.

    flock /tmp/chatloop-bench.lock .venv/bin/python -m benchmarks.window_attention --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from chatloop.models import StepBatch
from chatloop.models.kv_cache import PagedKVCache
from chatloop.models.stage_model import attend

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="steps timed together in a round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096, help="each sequence's length at the step")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--shape", default="32,8,128", help="query heads, kv heads, head dim (Mistral 7B's)")
    parser.add_argument("--block-size", type=int, default=16)
    a = parser.parse_args(argv)
    heads, kv_heads, head_dim = map(int, a.shape.split(","))
    blocks = -(-a.context // a.block_size)
    torch.manual_seed(0)
    tables = torch.arange(a.batch * blocks).view(a.batch, blocks).tolist()
    batch = StepBatch.build([a.context - 1] * a.batch, [1] * a.batch, tables, a.block_size)
    q = torch.randn(a.batch, 1, heads, head_dim)
    k, v = torch.randn(a.batch, 1, kv_heads, head_dim), torch.randn(a.batch, 1, kv_heads, head_dim)
    print(f"batch {a.batch}, context {a.context}, window {a.window}, heads {heads}/{kv_heads}x{head_dim}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    # The windowed layers' own pool: a sequence holds the blocks from its window's first on; the entries before name
    # its first live block (as SchedulerPolicy._step writes them).
    first = (a.context - a.window) // a.block_size
    live = blocks - first
    window_tables = [[b * live] * first + list(range(b * live, (b + 1) * live)) for b in range(a.batch)]
    own_pool = StepBatch.build([a.context - 1] * a.batch, [1] * a.batch, tables, a.block_size, window_tables)
    cases = (("every layer windowed (Mistral)", None, 0, batch),
             ("windowed beside full (Gemma, one pool)", {0}, 0, batch),
             ("windowed beside full (Gemma, own pool)", {0}, a.batch * live, own_pool))
    for label, windowed, num_window_blocks, step in cases:
        caches = {}
        for name, native in (("kernel", True), ("gathered", False)):
            caches[name] = PagedKVCache(range(2), a.batch * blocks, a.block_size, kv_heads, head_dim,
                                        native_attention=native, window=a.window,
                                        windowed_layers=None if windowed is None else frozenset(windowed),
                                        num_window_blocks=num_window_blocks)
        torch.manual_seed(1)
        for pool in ("keys", "values", "window_keys", "window_values"):
            getattr(caches["kernel"], pool).normal_()
            getattr(caches["gathered"], pool).copy_(getattr(caches["kernel"], pool))
        outs = {}
        for name, cache in caches.items():
            cache.begin(step)
            outs[name] = attend(q, 0, k, v, cache, step)
        assert caches["kernel"].decode_in_place and caches["kernel"].window_starts is not None
        diff = (outs["kernel"] - outs["gathered"]).abs().max().item()
        assert diff < 1e-4, f"{label}: the paths differ by {diff}"
        times: dict[str, list[float]] = {name: [] for name in caches}
        for r in range(a.rounds):
            for name in (list(caches) if r % 2 else list(caches)[::-1]):
                cache, start = caches[name], time.perf_counter()
                for _ in range(a.calls):
                    cache.begin(step)
                    attend(q, 0, k, v, cache, step)
                times[name].append((time.perf_counter() - start) / a.calls * 1e3)
        ratios = [g / n for g, n in zip(times["gathered"], times["kernel"])]
        print(f"{label}: kernel {statistics.median(times['kernel']):.3f} ms, gathered "
              f"{statistics.median(times['gathered']):.3f} ms a layer; gathered/kernel median "
              f"{statistics.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"max abs diff {diff:.1e}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
