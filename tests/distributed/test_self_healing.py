"""Self-healing with real workers: a killed or stopped worker is replaced, every running stream goes on with the
text it would have had, and a worker that fails at every start is given up, with the reason."""

from __future__ import annotations

import os

import pytest
from cluster_harness import run_cluster

TOPICS = ["the sea", "a cat", "Paris", "music", "bread", "rain", "mountains", "chess", "coffee", "the moon",
          "trees", "a robot", "winter", "bees", "a river", "the stars"]
STREAMS = [{"prompt": f"Write a few sentences about {t}.", "params": {"max_new_tokens": 80, "ignore_eos": True}}
           for t in TOPICS]
SEEDED = {"prompt": "Tell me a story.", "params": {"max_new_tokens": 40, "temperature": 0.8, "seed": 5,
                                                   "ignore_eos": True}}
SCORED = {"prompt": "Explain, step by step and in detail, how bread is made from wheat: " * 4,
          "params": {"max_new_tokens": 80, "ignore_eos": True, "logprobs": 2, "prompt_logprobs": True}}
FAULT_AFTER_TOKENS = 200  # into the faulty run: early in every stream, whatever the machine's speed


def _tokens(requests: list[dict]) -> int:
    return sum(r["params"]["max_new_tokens"] for r in requests)


HEALING = ["cluster.num_workers=4", "cluster.rpc_timeout_s=20", "cluster.heartbeat_timeout_s=2",
           "cluster.progress_deadline_s=6"]


def _resumed_after(streams: list[dict], at: float) -> float:
    """Seconds from ``at`` (the fault) to the first token a stream got after the pause the fault caused."""
    resumed = []
    for s in streams:
        times = s["times"]
        gaps = [(times[i] - times[i - 1], times[i]) for i in range(1, len(times)) if times[i] > at]
        if gaps:
            resumed.append(max(gaps)[1])  # the token that ended the longest pause after the fault
    return min(resumed) - at


def _check_replayed(results: dict, faulty: str, fault: str) -> float:
    reference, during = results["reference"], results[faulty]
    assert all(s["error"] is None for s in during), [s["error"] for s in during if s["error"]]
    for i, (want, got) in enumerate(zip(reference, during)):
        assert got["token_ids"] == want["token_ids"], f"stream {i} changed across the fault"
        for key in ("logprobs", "prompt_logprobs"):  # scored once each, and equally, across the replay
            if want[key]:
                assert got[key] == pytest.approx(want[key], abs=1e-4), f"stream {i}'s {key} changed across the fault"
    at = results[fault]["at"]
    assert any(t < at for s in during for t in s["times"]), "the fault came before any token: too early"
    assert all(s["times"][-1] > at + 0.5 for s in during), "some streams were done before the fault: too late"
    return _resumed_after(during, at)


def test_a_killed_worker_is_replaced_and_every_stream_goes_on():
    results = run_cluster(HEALING, [
        {"name": "reference", "op": "streams", "requests": [*STREAMS, SEEDED, SCORED]},
        {"name": "bg", "op": "start", "id": "run", "inner": {"op": "streams", "requests": [*STREAMS, SEEDED, SCORED]}},
        {"name": "wait", "op": "wait_tokens", "tokens": _tokens([*STREAMS, SEEDED, SCORED]) + FAULT_AFTER_TOKENS},
        {"name": "kill", "op": "signal", "stage": 2, "signal": "SIGKILL"},
        {"name": "run", "op": "join", "id": "run"},
        {"name": "stats", "op": "stats"},
        {"name": "health", "op": "describe"},
        {"name": "blocks", "op": "blocks"},
    ], timeout=600)
    results["faulty"] = results["run"]["result"]
    resumed = _check_replayed(results, "faulty", "kill")
    stats = results["stats"]
    print(f"SIGKILL worker2: first resumed token {resumed:.2f} s after the kill; recovery {stats['recovery_seconds']}")
    assert stats["state"] == "serving" and len(stats["recovery_seconds"]) == 1 and stats["replays"] >= 1
    assert stats["restarts"]["worker2"] == 1
    assert all(s["error"] is None for s in results["health"])  # healthy again by itself
    assert next(s for s in results["health"] if s["name"] == "worker2")["pid"] != results["kill"]["pid"]
    assert results["blocks"]["free"] == results["blocks"]["total"]
    assert resumed < 30


def test_a_stopped_worker_is_replaced_and_its_wake_up_harms_nothing():
    results = run_cluster(HEALING, [
        {"name": "reference", "op": "streams", "requests": STREAMS},
        {"name": "bg", "op": "start", "id": "run", "inner": {"op": "streams", "requests": STREAMS}},
        {"name": "wait", "op": "wait_tokens", "tokens": _tokens(STREAMS) + FAULT_AFTER_TOKENS},
        {"name": "stop", "op": "signal", "stage": 1, "signal": "SIGSTOP"},
        {"name": "stopped_for", "op": "sleep", "seconds": 8},  # past the heartbeat timeout and the deadline
        {"name": "cont", "op": "signal", "stage": 1, "signal": "SIGCONT"},
        {"name": "run", "op": "join", "id": "run"},
        {"name": "stats", "op": "stats"},
        {"name": "health", "op": "describe"},
    ], timeout=600)
    results["faulty"] = results["run"]["result"]
    resumed = _check_replayed(results, "faulty", "stop")
    print(f"SIGSTOP worker1: first resumed token {resumed:.2f} s after the stop; recovery "
          f"{results['stats']['recovery_seconds']}")
    assert results["cont"].get("gone")  # the stopped process was killed and replaced, not woken up
    assert results["stats"]["state"] == "serving" and all(s["error"] is None for s in results["health"])


def test_a_worker_that_fails_at_every_start_is_given_up_with_the_reason(tmp_path):
    # worker1 starts once (the cluster comes up), and dies at every start after that.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('CHATLOOP_WORKER_INDEX') == '1' and os.environ.get('CHATLOOP_WORKER_ATTEMPT') != '0':\n"
        "    print('worker1: the partition disk is gone', file=sys.stderr)\n"
        "    sys.stderr.flush()\n"
        "    os._exit(7)\n"
    )
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    try:
        results = run_cluster([*HEALING, "cluster.max_restarts=2"], [
            {"name": "kill", "op": "signal", "stage": 1, "signal": "SIGKILL"},
            {"name": "degraded", "op": "wait_state", "state": "degraded", "timeout": 120},
            {"name": "settle", "op": "sleep", "seconds": 3},
            {"name": "stats", "op": "stats"},
            {"name": "health", "op": "describe"},
            {"name": "refused", "op": "generate", "prompt": "Hello", "params": {"max_new_tokens": 2}},
        ], timeout=300)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    assert results["degraded"]["state"] == "degraded"
    assert results["stats"]["restarts"]["worker1"] == 2  # and no more: it does not loop
    down = {s["name"]: s["error"] for s in results["health"] if s["error"]}
    assert set(down) == {"worker1"}
    assert "failed 3 starts in a row (cluster.max_restarts=2)" in down["worker1"]
    assert "exited with code 7" in down["worker1"] and "the partition disk is gone" in down["worker1"]
    assert "ClusterUnavailableError" in results["refused"]["error"] and "worker1" in results["refused"]["error"]


def test_a_request_whose_deadline_passes_during_recovery_ends_with_a_clear_error(tmp_path):
    # worker1's replacement takes 8 s to start: long enough for a 2-second request to give up, clearly.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('CHATLOOP_WORKER_INDEX') == '1' and os.environ.get('CHATLOOP_WORKER_ATTEMPT') != '0':\n"
        "    time.sleep(8)\n"
    )
    os.environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    short = {"max_new_tokens": 8, "ignore_eos": True}
    try:
        results = run_cluster(HEALING, [
            {"name": "kill", "op": "signal", "stage": 1, "signal": "SIGKILL"},
            {"name": "recovering", "op": "wait_state", "state": "recovering", "timeout": 10},
            {"name": "hurried", "op": "timed_generate", "prompt": "Hello", "params": {**short, "timeout_s": 2}},
            {"name": "patient", "op": "timed_generate", "prompt": "Hello", "params": short},
            {"name": "stats", "op": "stats"},
        ], timeout=300)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    hurried = results["hurried"]
    assert "DeadlineExceededError" in hurried["result"]["error"], hurried
    assert "within its timeout of 2 s (the cluster was recovering: worker1" in hurried["result"]["error"]
    assert hurried["elapsed_s"] < 4
    assert "error" not in results["patient"]["result"] and len(results["patient"]["result"]["token_ids"]) == 8
    assert results["stats"]["state"] == "serving"
