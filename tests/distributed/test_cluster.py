"""Four real workers of SmolLM2 on loopback: golden tokens, batching, sampling, blocks, stage errors."""

from __future__ import annotations

import pytest
from cluster_harness import CHAT_PROMPT, GREEDY_32, PLAIN_PROMPT, run_cluster

# Sixteen prompts of different lengths, so one micro-batch pads and the sequences finish apart.
TOPICS = ["the sea", "a cat", "Paris in spring", "the history of the printing press in Europe", "music",
          "why the sky is blue, explained to a child who keeps asking questions", "bread", "a short poem about rain",
          "mountains", "the rules of chess", "coffee", "the moon landing in 1969 and what it meant", "trees",
          "a robot who learns to paint", "winter", "how bees make honey and why it matters for farming"]
REQUESTS = [{"prompt": f"Write about {t}.", "params": {"max_new_tokens": 8 + i % 5, "ignore_eos": True}}
            for i, t in enumerate(TOPICS)]
SAMPLED = {"max_new_tokens": 16, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1,
           "ignore_eos": True}


@pytest.fixture(scope="module")
def four_workers():
    ops = [
        {"name": "plain", "op": "generate", "prompt": PLAIN_PROMPT, "params": GREEDY_32},
        {"name": "chat", "op": "generate", "prompt": CHAT_PROMPT, "chat": True, "params": GREEDY_32},
        {"name": "together", "op": "concurrent", "requests": REQUESTS},
        *({"name": f"alone{i}", "op": "generate", **r} for i, r in enumerate(REQUESTS)),
        {"name": "seed123", "op": "generate", "prompt": PLAIN_PROMPT, "params": {**SAMPLED, "seed": 123}},
        {"name": "seed123_again", "op": "generate", "prompt": PLAIN_PROMPT, "params": {**SAMPLED, "seed": 123}},
        {"name": "seed7", "op": "generate", "prompt": PLAIN_PROMPT, "params": {**SAMPLED, "seed": 7}},
        {"name": "cancelled", "op": "cancel_after", "prompt": PLAIN_PROMPT, "tokens": 3,
         "params": {"max_new_tokens": 200, "ignore_eos": True}},
        {"name": "blocks_after_cancel", "op": "blocks"},
        {"name": "inject", "op": "inject", "stage": 2},
        {"name": "failed", "op": "generate", "prompt": PLAIN_PROMPT, "params": {"max_new_tokens": 4}},
        {"name": "after_failure", "op": "generate", "prompt": PLAIN_PROMPT,
         "params": {"max_new_tokens": 4, "ignore_eos": True}},
        {"name": "blocks_at_end", "op": "blocks"},
    ]
    return run_cluster(["cluster.num_workers=4"], ops)


def test_greedy_equals_transformers(four_workers, hf_greedy):
    assert four_workers["plain"]["token_ids"] == hf_greedy["plain"]
    assert four_workers["chat"]["token_ids"] == hf_greedy["chat"]
    assert "Paris" in four_workers["chat"]["text"]


def test_concurrent_requests_equal_their_single_answers(four_workers):
    together = four_workers["together"]
    assert all("error" not in r for r in together)
    for i, batched in enumerate(together):
        assert batched["token_ids"] == four_workers[f"alone{i}"]["token_ids"], f"request {i} changed when batched"
        assert len(batched["token_ids"]) == REQUESTS[i]["params"]["max_new_tokens"]


def test_seeded_sampling_is_reproducible(four_workers):
    assert four_workers["seed123"]["token_ids"] == four_workers["seed123_again"]["token_ids"]
    assert four_workers["seed123"]["token_ids"] != four_workers["seed7"]["token_ids"]


def test_cancelled_and_finished_sequences_give_back_their_blocks(four_workers):
    assert four_workers["cancelled"]["received"] == 3
    blocks = four_workers["blocks_after_cancel"]
    assert blocks["free"] == blocks["total"] > 0
    final = four_workers["blocks_at_end"]
    assert final["free"] == final["total"]


def test_stage_error_names_the_stage_and_the_cluster_goes_on(four_workers):
    failed = four_workers["failed"]
    assert "error" in failed and "worker2" in failed["error"], failed
    assert four_workers["after_failure"]["token_ids"] == four_workers["plain"]["token_ids"][:4]
