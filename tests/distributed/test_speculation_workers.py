"""Speculative decoding over real workers: a draft model on the coordinator and n-gram drafts give the same greedy
tokens over 2 workers as without speculation, alone and in a mixed batch, every KV block comes back, and a sequence
whose worker is killed mid-stream is replayed from its accepted tokens and ends with the same tokens."""

from __future__ import annotations

import random
import shutil

import pytest
from cluster_harness import run_cluster

from tests.conftest import build_tiny_model, save_tiny_tokenizer

rng = random.Random(2)
BASE = [rng.randrange(2, 120) for _ in range(8)]
PROMPT = BASE * 2 + [rng.randrange(2, 120) for _ in range(4)] + BASE[:4]
OTHER = [rng.randrange(2, 120) for _ in range(12)]
GREEDY = {"max_new_tokens": 40, "temperature": 0.0, "ignore_eos": True}
LONG = {"max_new_tokens": 200, "temperature": 0.0, "ignore_eos": True}


@pytest.mark.slow
def test_drafts_over_two_workers_give_the_same_greedy_tokens_and_survive_a_replaced_worker(tiny_checkpoint, tmp_path):
    model, draft = tmp_path / "model", tmp_path / "draft"
    shutil.copytree(tiny_checkpoint("llama").path, model)
    save_tiny_tokenizer(model)
    build_tiny_model("llama", seed=1).save_pretrained(draft)  # another random model: many drafts rejected
    save_tiny_tokenizer(draft)
    off = {**GREEDY, "speculative_tokens": 0}
    results = run_cluster(
        [f"model.name={model}", f"model.partitions_dir={tmp_path / 'parts'}", "cluster.num_workers=2",
         "speculative=draft", f"speculative.draft_model={draft}", "speculative.draft_quantization=null",
         "speculative.num_tokens=3", "cluster.heartbeat_timeout_s=2", "cluster.progress_deadline_s=6"],
        [
            {"name": "plain", "op": "generate", "prompt": PROMPT, "params": off},
            {"name": "plain_long", "op": "generate", "prompt": OTHER, "params": {**LONG, "speculative_tokens": 0}},
            {"name": "draft", "op": "generate", "prompt": PROMPT, "params": GREEDY},
            {"name": "ngram", "op": "generate", "prompt": PROMPT, "params": {**GREEDY, "speculative_method": "ngram"}},
            {"name": "mixed", "op": "concurrent", "requests": [
                {"prompt": PROMPT, "params": GREEDY}, {"prompt": PROMPT, "params": off},
                {"prompt": OTHER, "params": {**GREEDY, "speculative_method": "ngram", "max_new_tokens": 25}},
                {"prompt": PROMPT, "params": {**GREEDY, "speculative_tokens": 6}}]},
            {"name": "pid", "op": "signal", "stage": 1, "signal": "SIGCONT"},  # (looks the pid up beforehand)
            {"name": "bg", "op": "start", "id": "run", "inner": {"op": "streams", "requests": [
                {"prompt": OTHER, "params": LONG}]}},
            {"name": "wait", "op": "wait_tokens", "tokens": 10},
            {"name": "kill", "op": "signal", "stage": 1, "signal": "SIGKILL"},
            {"name": "serving", "op": "wait_state", "state": "serving", "timeout": 240},
            {"name": "replayed", "op": "join", "id": "run"},
            {"name": "stats", "op": "stats"},
            {"name": "blocks", "op": "blocks"},
        ],
        timeout=600,
    )
    plain = results["plain"]["token_ids"]
    assert len(plain) == 40 and results["plain"]["drafted_tokens"] is None
    draft_run = results["draft"]
    assert draft_run["token_ids"] == plain and results["ngram"]["token_ids"] == plain
    assert draft_run["drafted_tokens"] > draft_run["accepted_tokens"] >= 0
    assert results["ngram"]["drafted_tokens"] > 0
    mixed = results["mixed"]
    assert [m["token_ids"] for m in mixed] == [plain, plain, results["plain_long"]["token_ids"][:25], plain]
    replayed = results["replayed"]["result"][0]
    assert results["serving"]["state"] == "serving" and results["stats"]["replays"] >= 1
    assert replayed["error"] is None and replayed["token_ids"] == results["plain_long"]["token_ids"]
    assert results["blocks"]["free"] == results["blocks"]["total"]
