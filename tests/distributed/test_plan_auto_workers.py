"""``cluster.plan=auto`` through real worker processes (issue 24, points 1-4): each worker probes its host when it
joins, the coordinator plans the ranges from the probes, and every worker loads its planned range from the split's
files, giving transformers' greedy text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cluster_harness import PLAIN_PROMPT, free_port, run_cluster

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
    assert all(0 < s["hop_ms"] < 1000 for s in plan["stages"])  # each to the next worker, the last's to us
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


@pytest.mark.slow
def test_torchrun_plans_auto_and_loads_the_plan(smollm2_split, smollm2_hf, tmp_path):
    """The same plan under torchrun (issue 24, point 2): rank 0 coordinates, ranks 1 and 2 are the workers; each
    probes when it joins, the coordinator logs the plan, and every worker loads the range planned for it."""
    from transformers import AutoTokenizer

    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--no-python", str(bin_dir / "chatloop-generate"),
           f"prompt={PLAIN_PROMPT}", "chat=false", f"max_new_tokens={NEW_TOKENS}", "sampling.temperature=0",
           "cache.kv_cache_mb=64", "cluster.plan=auto", f"model.partitions_dir={smollm2_split}",
           "cluster.num_workers=2", "worker.worker_threads=1", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = proc.stdout + proc.stderr
    planned = re.findall(r"plan auto: (worker\d) layers (\d+)-(\d+)", logs)
    loaded = re.findall(r"(worker\d): layers (\d+)-(\d+), \d+ KV blocks", logs)
    assert [w for w, _, _ in planned] == ["worker0", "worker1"], logs[-4000:]
    assert [i for _, a, b in planned for i in range(int(a), int(b) + 1)] == list(range(30))
    assert loaded == planned  # each worker loaded what the plan gave it
    assert re.search(r"plan auto: predicted [\d.]+ tokens/s at batch 1", logs)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_split)
    ids = tokenizer(PLAIN_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        golden = smollm2_hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=smollm2_hf.config.eos_token_id)[0, ids.shape[1]:]
    assert tokenizer.decode(golden).strip() in proc.stdout, (proc.stdout, tokenizer.decode(golden))
