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
SAMPLED = {"max_new_tokens": 16, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1, "ignore_eos": True}


@pytest.fixture(scope="module")
def four_workers():
    ops = [
        {"op": "generate", "prompt": PLAIN_PROMPT, "params": GREEDY_32},
        {"op": "generate", "prompt": CHAT_PROMPT, "chat": True, "params": GREEDY_32},
        {"op": "concurrent", "requests": REQUESTS},
        *({"op": "generate", **r} for r in REQUESTS),
        {"op": "generate", "prompt": PLAIN_PROMPT, "params": {**SAMPLED, "seed": 123}},
        {"op": "generate", "prompt": PLAIN_PROMPT, "params": {**SAMPLED, "seed": 123}},
        {"op": "generate", "prompt": PLAIN_PROMPT, "params": {**SAMPLED, "seed": 7}},
        {"op": "cancel_after", "prompt": PLAIN_PROMPT, "tokens": 3, "params": {"max_new_tokens": 200, "ignore_eos": True}},
        {"op": "blocks"},
        {"op": "inject", "stage": 2},
        {"op": "generate", "prompt": PLAIN_PROMPT, "params": {"max_new_tokens": 4}},
        {"op": "generate", "prompt": PLAIN_PROMPT, "params": {"max_new_tokens": 4, "ignore_eos": True}},
        {"op": "blocks"},
    ]
    return run_cluster(["cluster.num_workers=4"], ops)


def test_greedy_equals_transformers(four_workers, hf_greedy):
    assert four_workers[0]["token_ids"] == hf_greedy["plain"]
    assert four_workers[1]["token_ids"] == hf_greedy["chat"]
    assert "Paris" in four_workers[1]["text"]


def test_concurrent_requests_equal_their_single_answers(four_workers):
    together, alone = four_workers[2], four_workers[3 : 3 + len(REQUESTS)]
    assert all("error" not in r for r in together)
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a["token_ids"] == b["token_ids"], f"request {i} changed when batched"
        assert len(a["token_ids"]) == REQUESTS[i]["params"]["max_new_tokens"]


def test_seeded_sampling_is_reproducible(four_workers):
    first, second, other = four_workers[19:22]
    assert first["token_ids"] == second["token_ids"]
    assert first["token_ids"] != other["token_ids"]


def test_cancelled_and_finished_sequences_give_back_their_blocks(four_workers):
    assert four_workers[22]["received"] == 3
    blocks = four_workers[23]
    assert blocks["free"] == blocks["total"] > 0
    final = four_workers[-1]
    assert final["free"] == final["total"]


def test_stage_error_names_the_stage_and_the_cluster_goes_on(four_workers):
    failed, after = four_workers[25], four_workers[26]
    assert "error" in failed and "worker2" in failed["error"], failed
    assert after["token_ids"] == four_workers[0]["token_ids"][:4]
