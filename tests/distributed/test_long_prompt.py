"""An 8,000-token prompt over 4 workers: prefilled in chunks, no step past the RPC timeout, and short requests
sent just after it keep their pace."""

from __future__ import annotations

import random

from cluster_harness import run_cluster

LONG = random.Random(0).choices(range(300, 40000), k=8000)  # token ids: SmolLM2's context is 8192
SHORT = [f"Question {i}: what is {i} plus {i}?" for i in range(3)]
SHORT_PARAMS = {"max_new_tokens": 8, "ignore_eos": True}


def test_a_long_prompt_is_prefilled_in_chunks_while_short_requests_keep_their_pace():
    short_ops = [{"op": "timed_generate", "prompt": p, "params": SHORT_PARAMS} for p in SHORT]
    results = run_cluster(
        ["cluster.num_workers=4", "cache.kv_cache_mb=256", "batching.prefill_chunk_tokens=256"],
        [
            *({"name": f"alone{i}", **op} for i, op in enumerate(short_ops)),
            {"name": "long", "op": "start", "id": "long",
             "inner": {"op": "timed_generate", "prompt": LONG, "params": {"max_new_tokens": 4, "ignore_eos": True}}},
            {"name": "pause", "op": "sleep", "seconds": 1.0},
            {"name": "together", "op": "concurrent", "requests": short_ops},
            {"name": "long_done", "op": "join", "id": "long"},
            {"name": "blocks", "op": "blocks"},
        ],
        timeout=600,
    )
    long = results["long_done"]["result"]
    assert "error" not in long["result"], long
    assert len(long["result"]["token_ids"]) == 4
    alone = [results[f"alone{i}"]["elapsed_s"] for i in range(3)]
    during = [r["elapsed_s"] for r in results["together"]]
    print(f"long prompt: {long['elapsed_s']:.1f} s; short alone {alone}; during the long prefill {during}")
    for i, r in enumerate(results["together"]):
        assert r["result"]["token_ids"] == results[f"alone{i}"]["result"]["token_ids"]
    # The bound: prefill chunks and decode steps take turns, so a short request waits for at most one chunk
    # before each of its 9 steps (its prompt and 8 tokens); chunks grow with the context, the last about twice
    # the mean (measured here: 8000 tokens in 32 chunks of 256, ~31 s; short requests 0.3-0.4 s alone, ~6.6 s).
    chunk_s = long["elapsed_s"] / -(-len(LONG) // 256)
    assert max(during) < max(alone) + 9 * 2 * chunk_s, (alone, during, long["elapsed_s"])
    assert max(during) < long["elapsed_s"] / 2  # they did not wait for the whole prefill
    assert results["blocks"]["free"] == results["blocks"]["total"]
