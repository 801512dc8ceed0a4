"""What a worker and the runtime check about themselves: a worker's own GET /health (the one its container's health
check reads) answers what the coordinator sees; the torch in use has the private RPC state recovery resets."""

from __future__ import annotations

from types import SimpleNamespace

import httpx

from chatloop.network import free_port
from chatloop.runtime import worker
from chatloop.runtime.worker_host import WorkerHost


def test_a_worker_whose_stage_turned_unhealthy_answers_503_with_the_reason():
    host = WorkerHost()
    port = worker.start_health_endpoint("worker1", free_port(), host)
    assert port is not None
    host.activity.update(state="serving", generation=3)
    stage = SimpleNamespace(runner=SimpleNamespace(unhealthy=None))
    host.stage = stage  # type: ignore[assignment]
    healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert healthy.status_code == 200 and healthy.json()["unhealthy"] is None and healthy.json()["generation"] == 3
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


def test_the_coordinators_calls_reach_the_worker_this_process_serves(monkeypatch):
    from chatloop.engine import StageError
    from chatloop.runtime import worker_host

    monkeypatch.setattr(worker_host, "PROCESS_WORKER", None)
    try:
        worker_host.alive()
    except StageError as e:
        assert "this process serves no worker" in str(e)
    else:
        raise AssertionError("a call reached no worker and did not say so")
    host = WorkerHost()
    worker_host.serve(host)
    assert worker_host.PROCESS_WORKER is host and worker_host.alive()[1:] == (None, None)  # no stage: idle, healthy
    try:
        worker_host.describe()
    except StageError as e:
        assert "this worker holds no stage yet" in str(e)
    else:
        raise AssertionError("a worker without a stage described one")
