"""Gemma 3's windowed layers in a pool of their own over real workers (issue 20 point 3): the window tables travel
with every micro-batch over RPC; n-gram drafts and chunked prefill give transformers' greedy tokens; a worker killed
mid-stream is replaced and its sequence prefilled again into fresh blocks of both pools, ending with the same
tokens; every block of both pools comes back."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from cluster_harness import run_cluster

from tests.conftest import save_tiny_tokenizer

rng = random.Random(4)
BASE = [rng.randrange(2, 120) for _ in range(6)]
PROMPT = BASE * 3 + [rng.randrange(2, 120) for _ in range(5)]  # 23 tokens: past the window of 8 before it decodes
GREEDY = {"max_new_tokens": 40, "temperature": 0.0, "ignore_eos": True}
LONG = {"max_new_tokens": 120, "temperature": 0.0, "ignore_eos": True}


def transformers_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_gemma_window_tables_over_two_workers_with_drafts_chunks_and_a_replaced_worker(tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint("gemma3_text")
    model = tmp_path / "model"
    shutil.copytree(checkpoint.path, model)
    save_tiny_tokenizer(model)
    results = run_cluster(
        [f"model.name={model}", f"model.partitions_dir={tmp_path / 'parts'}", "cluster.num_workers=2",
         "cache.block_size=4", "batching.prefill_chunk_tokens=8", "cluster.heartbeat_timeout_s=2",
         "cluster.progress_deadline_s=6"],
        [
            {"name": "stages", "op": "describe"},
            {"name": "plain", "op": "generate", "prompt": PROMPT, "params": GREEDY},
            {"name": "ngram", "op": "generate", "prompt": PROMPT, "params": {**GREEDY, "speculative_method": "ngram"}},
            {"name": "plain_long", "op": "generate", "prompt": PROMPT, "params": LONG},
            {"name": "pid", "op": "signal", "stage": 1, "signal": "SIGCONT"},  # (looks the pid up beforehand)
            {"name": "bg", "op": "start", "id": "run", "inner": {"op": "streams", "requests": [
                {"prompt": PROMPT, "params": LONG}]}},
            {"name": "wait", "op": "wait_tokens", "tokens": 30},
            {"name": "kill", "op": "signal", "stage": 1, "signal": "SIGKILL"},
            {"name": "serving", "op": "wait_state", "state": "serving", "timeout": 240},
            {"name": "replayed", "op": "join", "id": "run"},
            {"name": "stats", "op": "stats"},
            {"name": "blocks", "op": "blocks"},
        ],
        timeout=600,
    )
    assert all(r["num_window_blocks"] for r in results["stages"])  # both stages hold windowed layers
    plain = results["plain"]["token_ids"]
    assert plain == transformers_greedy(checkpoint.model, PROMPT, 40)
    assert results["ngram"]["token_ids"] == plain and results["ngram"]["drafted_tokens"] > 0
    replayed = results["replayed"]["result"][0]
    assert results["serving"]["state"] == "serving" and results["stats"]["replays"] >= 1
    assert replayed["error"] is None and replayed["token_ids"] == results["plain_long"]["token_ids"]
    assert results["plain_long"]["token_ids"][:40] == plain
    blocks = results["blocks"]
    assert blocks["free"] == blocks["total"] and blocks["window_free"] == blocks["window_total"] > 0
