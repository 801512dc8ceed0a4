"""A stage that stops making progress: health says so and names it, a step that times out names it and is
dropped everywhere, and the cluster carries on once the stage is back. (Without self-healing: with it, such a
stage is replaced, see test_self_healing.py.)"""

from __future__ import annotations

from cluster_harness import PLAIN_PROMPT, run_cluster

RPC_TIMEOUT_S = 10
DEADLINE_S = 2


def _down(stages: list[dict]) -> dict[str, str]:
    return {s["name"]: s["error"] for s in stages if s["error"]}


def test_a_stopped_or_stalled_stage_is_reported_and_named():
    short = {"max_new_tokens": 4, "ignore_eos": True}
    results = run_cluster(
        ["cluster.num_workers=4", f"cluster.rpc_timeout_s={RPC_TIMEOUT_S}",
         f"cluster.progress_deadline_s={DEADLINE_S}", "cluster.self_healing=false"],
        [
            {"name": "before", "op": "generate", "prompt": PLAIN_PROMPT, "params": short},
            # worker1's compute thread stalls 6 s (under the RPC timeout) while its RPC threads answer: not healthy
            {"name": "stall", "op": "inject", "stage": 1, "stall_s": 6},
            {"name": "bg", "op": "start", "id": "slow", "inner": {"op": "generate", "prompt": PLAIN_PROMPT,
                                                                  "params": short}},
            {"name": "wait", "op": "sleep", "seconds": DEADLINE_S + 2},
            {"name": "while_stalled", "op": "describe"},
            {"name": "slow", "op": "join", "id": "slow"},
            {"name": "after_stall", "op": "describe"},
            # worker2 stopped outright: the step times out and its error names worker2
            {"name": "stop", "op": "signal", "stage": 2, "signal": "SIGSTOP"},
            {"name": "while_stopped", "op": "timed_generate", "prompt": PLAIN_PROMPT, "params": short},
            {"name": "health_stopped", "op": "describe"},
            {"name": "cont", "op": "signal", "stage": 2, "signal": "SIGCONT"},
            {"name": "settle", "op": "sleep", "seconds": 1.0},
            {"name": "after_cont", "op": "describe"},
            {"name": "after", "op": "generate", "prompt": PLAIN_PROMPT, "params": short},
            {"name": "blocks", "op": "blocks"},
        ],
    )
    assert _down(results["while_stalled"]).keys() == {"worker1"}, results["while_stalled"]
    assert "no progress" in _down(results["while_stalled"])["worker1"]
    assert results["slow"]["result"]["token_ids"] == results["before"]["token_ids"]  # late, not lost
    assert not _down(results["after_stall"])

    stopped = results["while_stopped"]
    assert "worker2" in stopped["result"]["error"] and "does not answer" in stopped["result"]["error"], stopped
    assert stopped["elapsed_s"] < RPC_TIMEOUT_S + 8  # the timeout, plus asking each stage where the step is
    assert "worker2" in _down(results["health_stopped"])
    # Woken up, worker2 drops the micro-batch the coordinator cancelled (it may have computed it already, if the
    # step reached its compute thread before the cancel did, but it does not forward it): worker3 never sees it.
    computed = {s["name"]: s["num_micro_batches"] for s in results["after_cont"]}
    while_stopped = {s["name"]: s["num_micro_batches"] for s in results["health_stopped"]}
    assert computed["worker3"] == while_stopped["worker3"] and computed["worker2"] - computed["worker3"] in (0, 1)
    assert results["after"]["token_ids"] == results["before"]["token_ids"]  # the dropped step left nothing behind
    assert results["blocks"]["free"] == results["blocks"]["total"]
