"""``cluster.plan=auto`` through real worker processes (issue 24, points 1-4): each worker probes its host when it
joins, the coordinator plans the ranges from the probes, and every worker loads its planned range from the split's
files, giving transformers' greedy text."""

from __future__ import annotations

import pytest
import torch
from cluster_harness import PLAIN_PROMPT, run_cluster

NEW_TOKENS = 16


@pytest.mark.slow
def test_workers_probe_at_join_and_load_the_planned_ranges(smollm2_split, smollm2_hf):
    from transformers import AutoTokenizer

    results = run_cluster(
        [f"model.partitions_dir={smollm2_split}", "cluster.num_workers=4", "cluster.plan=auto",
         "worker.worker_threads=1"],
        [{"name": "text", "op": "generate", "prompt": PLAIN_PROMPT,
          "params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}},
         {"name": "stages", "op": "describe"}, {"name": "plan", "op": "plan"}],
    )
    ranges = [tuple(int(x) for x in str(s["layers"]).split("-")) for s in results["stages"]]
    plan = results["plan"]  # the status page's: the generation's plan, as loaded, and the request's measured pace
    assert [s["layers"] for s in plan["stages"]] == [str(s["layers"]) for s in results["stages"]]
    assert all(s["threads"] == 1 and s["layer_ms"]["1"] > 0 for s in plan["stages"])
    assert plan["predicted"]["tokens_per_s_1"] > 0 and plan["measured"]["tokens_per_s_1"] > 0
    assert [i for a, b in ranges for i in range(a, b + 1)] == list(range(30))  # every layer once, in order
    # SmolLM2's head (its tied 49152 x 576 embedding) weighs 8 of its layers: the last stage, which computes it at
    # every step, gets fewer than the even split's 7 layers (unless its worker measured itself twice as fast)
    assert ranges[-1][1] - ranges[-1][0] + 1 < 7, ranges
    ids = AutoTokenizer.from_pretrained(smollm2_split)(PLAIN_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        golden = smollm2_hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=smollm2_hf.config.eos_token_id)[0, ids.shape[1]:].tolist()
    assert results["text"]["token_ids"] == golden, results["text"]


@pytest.mark.slow
def test_a_replaced_worker_is_planned_again_and_the_text_is_unchanged(smollm2_split):
    """Point 5: self-healing starts a new generation, in which every worker probes again and the plan is made again;
    the replaced worker loads its (new) range, and greedy text after the recovery is the text before it."""
    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
    results = run_cluster(
        [f"model.partitions_dir={smollm2_split}", "cluster.num_workers=3", "cluster.plan=auto",
         "worker.worker_threads=1"],
        [{"name": "before", "op": "generate", "prompt": PLAIN_PROMPT, "params": greedy},
         {"name": "kill", "op": "signal", "stage": 1, "signal": "SIGKILL"},
         {"name": "after", "op": "generate", "prompt": PLAIN_PROMPT, "params": greedy},
         {"name": "stats", "op": "stats"},
         {"name": "stages", "op": "describe"}],
        timeout=600,
    )
    assert results["stats"]["restarts"]["worker1"] == 1, results["stats"]
    assert results["after"]["token_ids"] == results["before"]["token_ids"], results
    ranges = [tuple(int(x) for x in str(s["layers"]).split("-")) for s in results["stages"]]
    assert [i for a, b in ranges for i in range(a, b + 1)] == list(range(30))
