"""Prefix caching over real workers: a request that shares a prefix computes only the rest on every stage and gives
the same tokens; after a killed worker is replaced the coordinator's cache starts empty, and the tokens stay right."""

from __future__ import annotations

import pytest
from cluster_harness import run_cluster

CONTEXT = ("The old lighthouse stood at the end of a long stone pier. Every night the keeper climbed its one hundred "
           "and twelve steps, lit the lamp, and watched the ships pass in the dark. One winter a storm broke the "
           "windows of the lantern room, and the keeper had to keep the flame alive with his own coat. ")
GREEDY = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
FIRST = {"op": "generate", "prompt": CONTEXT + "Question: on the night of the storm, how many steps did the keeper "
         "climb to reach the lamp, and what did he use to keep its flame alive until the morning? Answer:",
         "params": GREEDY}
OTHER = {"op": "generate", "prompt": CONTEXT + "Question: what broke the windows? Answer:", "params": GREEDY}


@pytest.mark.slow
def test_a_shared_prefix_is_computed_once_and_a_replaced_worker_starts_with_an_empty_cache():
    results = run_cluster(
        ["cluster.num_workers=2", "cluster.heartbeat_timeout_s=2", "cluster.progress_deadline_s=6"],
        [
            {"name": "cold", **FIRST},
            {"name": "other", **OTHER},
            {"name": "before", "op": "stats"},
            {"name": "hit", **FIRST},
            {"name": "after", "op": "stats"},
            {"name": "kill", "op": "signal", "stage": 1, "signal": "SIGKILL"},
            {"name": "recovering", "op": "wait_state", "state": "recovering", "timeout": 60},
            {"name": "serving", "op": "wait_state", "state": "serving", "timeout": 240},
            {"name": "replaced", **FIRST},
            {"name": "healed", "op": "stats"},
            {"name": "again", **FIRST},
            {"name": "blocks", "op": "blocks"},
        ],
        timeout=600,
    )
    cold, other, hit = results["cold"], results["other"], results["hit"]
    assert all("error" not in results[k] for k in ("cold", "other", "hit", "replaced", "again")), results
    assert cold["cached_tokens"] == 0 and other["cached_tokens"] >= 48  # the context's full blocks, on both stages
    assert hit["token_ids"] == cold["token_ids"] and hit["cached_tokens"] > other["cached_tokens"]
    assert results["after"]["prefix_hits"] - results["before"]["prefix_hits"] == hit["cached_tokens"]
    # The worker is replaced; the coordinator emptied its cache: nothing is found, then it fills again.
    assert results["recovering"]["state"] == "recovering" and results["serving"]["state"] == "serving"
    assert results["healed"]["restarts"]["worker1"] == 1
    assert results["replaced"]["token_ids"] == cold["token_ids"] and results["replaced"]["cached_tokens"] == 0
    assert results["healed"]["prefix_hits"] == results["after"]["prefix_hits"]
    assert results["again"]["token_ids"] == cold["token_ids"] and results["again"]["cached_tokens"] == hit[
        "cached_tokens"]
    assert results["blocks"]["free"] == results["blocks"]["total"]
