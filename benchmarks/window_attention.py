"""One layer's decode attention past a sliding window: the attention kernel from each token's window start against
torch's gathered path (the blocks gathered, SDPA with the window's mask), in alternating rounds.

Two cases of ``PagedKVCache``: every layer windowed (Mistral: the gathered path already skips the blocks before the
window) and a windowed layer beside full ones (Gemma 2/3: it gathers the whole context and masks it). Both paths
read the same cache; their outputs are checked equal before timing.

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
    for label, windowed in (("every layer windowed (Mistral)", None), ("windowed beside full (Gemma)", {0})):
        caches = {}
        for name, native in (("kernel", True), ("gathered", False)):
            caches[name] = PagedKVCache(range(2), a.batch * blocks, a.block_size, kv_heads, head_dim,
                                        native_attention=native, window=a.window,
                                        windowed_layers=None if windowed is None else frozenset(windowed))
        torch.manual_seed(1)
        caches["kernel"].keys.normal_(), caches["kernel"].values.normal_()
        caches["gathered"].keys.copy_(caches["kernel"].keys), caches["gathered"].values.copy_(caches["kernel"].values)
        outs = {}
        for name, cache in caches.items():
            cache.begin(batch)
            outs[name] = attend(q, 0, k, v, cache, batch)
        assert caches["kernel"].decode_in_place and caches["kernel"].window_starts is not None
        diff = (outs["kernel"] - outs["gathered"]).abs().max().item()
        assert diff < 1e-4, f"{label}: the paths differ by {diff}"
        times: dict[str, list[float]] = {name: [] for name in caches}
        for r in range(a.rounds):
            for name in (list(caches) if r % 2 else list(caches)[::-1]):
                cache, start = caches[name], time.perf_counter()
                for _ in range(a.calls):
                    cache.begin(batch)
                    attend(q, 0, k, v, cache, batch)
                times[name].append((time.perf_counter() - start) / a.calls * 1e3)
        ratios = [g / n for g, n in zip(times["gathered"], times["kernel"])]
        print(f"{label}: kernel {statistics.median(times['kernel']):.3f} ms, gathered "
              f"{statistics.median(times['gathered']):.3f} ms a layer; gathered/kernel median "
              f"{statistics.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"max abs diff {diff:.1e}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
