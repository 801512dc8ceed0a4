"""What a worker and the runtime check about themselves: a worker's own GET /health (the one its container's health
check reads) answers what the coordinator sees; the torch in use has the private RPC state recovery resets."""

from __future__ import annotations

from types import SimpleNamespace

import httpx

from chatloop.network import free_port
from chatloop.runtime import remote_stage, worker


def test_a_worker_whose_stage_turned_unhealthy_answers_503_with_the_reason(monkeypatch):
    port = worker.start_health_endpoint("worker1", free_port())
    assert port is not None
    monkeypatch.setitem(worker.STATE, "state", "serving")
    stage = SimpleNamespace(runner=SimpleNamespace(unhealthy=None))
    monkeypatch.setattr(remote_stage, "CURRENT", stage)
    healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert healthy.status_code == 200 and healthy.json()["unhealthy"] is None
    stage.runner.unhealthy = "its hidden states hold NaN or infinity for all 3 sequences of micro-batch 7"
    sick = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert sick.status_code == 503
    assert sick.json()["unhealthy"].startswith("its hidden states hold NaN") and sick.json()["stage_loaded"] is True


def test_a_torch_without_the_private_rpc_state_recovery_resets_is_refused_with_what_to_install(monkeypatch):
    from chatloop.runtime import rendezvous

    rendezvous.check_private_rpc_state()  # the pinned torch has it
    monkeypatch.delattr(rendezvous.rpc.api, "_all_gather_sequence_id")
    try:
        rendezvous.check_private_rpc_state()
    except RuntimeError as e:
        assert "_all_gather_sequence_id" in str(e) and f"install torch {rendezvous.TESTED_TORCH}" in str(e)
    else:
        raise AssertionError("a torch without the state was accepted")
