"""A lost worker nobody here restarts (a container stopped by hand, a worker started by hand): the watchdog's log
lines, /health, chatloop-status and the requests' error name it and the command that brings it back.

The watchdog runs for real over a fake cluster (no RPC): a stage reported lost, a generation that does not form.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from types import SimpleNamespace

import pytest

from chatloop.engine import ClusterUnavailableError, EngineStats
from chatloop.runtime import members
from chatloop.runtime.cluster import GenerationError, RpcCluster
from chatloop.runtime.generation import not_joined
from chatloop.runtime.healing import Watchdog
from chatloop.serving.health import HealthReport
from chatloop.serving.status import build_status, format_table

CONTAINER = {"pid": 1, "host": "74289f73b070", "container": "chatloop-worker-2", "engine": "podman"}
BY_HAND = {"pid": 4242, "host": "vm", "command": "chatloop-worker --config /srv/worker-config-1.yaml "
                                                 "--coordinator 10.0.0.1:50050"}


class FakeGeneration:
    """Generation ``number``: the one being lost, or the next one, which does not form in time."""

    def __init__(self, cluster: FakeCluster, number: int) -> None:
        self.cluster, self.number, self.pipeline = cluster, number, None

    def heartbeat(self) -> dict[int, str]:
        return {}

    def form(self, deadline: float, on_exit, waited: str, join_deadline=None) -> None:
        cluster = self.cluster
        cluster.lost_while_recovering = {k: str(loss) for k, loss in cluster.watchdog.lost.items()}  # what /health says
        cluster.formed.set()
        raise not_joined(sorted(cluster.lost_while_recovering), cluster.known, cluster.rendezvous, "external", waited)

    def load(self, deadline: float) -> None:  # pragma: no cover - the generation never forms
        raise AssertionError("not reached")

    def leave(self) -> None:
        self.cluster.rendezvous.end(self.number)


class FakeCluster:
    """What the watchdog uses of :class:`RpcCluster`: workers started elsewhere (no supervisors), one generation
    that is lost, and a next one that does not form in time."""

    def __init__(self, known: dict[int, dict]) -> None:
        self.cfg = SimpleNamespace(cluster=SimpleNamespace(
            heartbeat_interval_s=60.0, heartbeat_timeout_s=3.0, recovery_timeout_s=60.0, num_workers=4,
            launch="external"))
        self.supervisors: list = []
        self.pipeline = None
        self.current = FakeGeneration(self, 4)
        self.known = dict(known)
        self.members = dict(known)
        self.stage_names = [f"worker{k}" for k in range(4)]
        self.listener = SimpleNamespace(lost=[], unavailable=[],
                                        pipeline_lost=lambda reason: self.listener.lost.append(reason) or 3,
                                        pipeline_unavailable=lambda e: self.listener.unavailable.append(e))
        self.rendezvous = SimpleNamespace(where="coordinator:50050", evicted=[], ended=[],
                                          evict=lambda k, pid: self.rendezvous.evicted.append((k, pid)),
                                          end=lambda g: self.rendezvous.ended.append(g), failure=lambda k: None)
        self.lost_while_recovering: dict[int, str] = {}
        self.formed = threading.Event()

    def begin(self) -> FakeGeneration:
        self.current = FakeGeneration(self, self.current.number + 1)
        return self.current

    def announced(self, index: int) -> dict | None:
        return self.known.get(index) or self.members.get(index)

    def evict(self, index: int) -> None:
        self.rendezvous.evict(index, self.known[index]["pid"])


def _lose(cluster: FakeCluster, lost: dict[int, str]) -> Watchdog:
    watchdog = cluster.watchdog = Watchdog(cluster, cluster.cfg.cluster)  # type: ignore[arg-type]
    try:
        watchdog.report(lost, generation=4)
        assert cluster.formed.wait(10), "the watchdog did not try to form the next generation"
        for _ in range(100):
            if watchdog.state == "degraded":
                break
            time.sleep(0.05)
    finally:
        watchdog.stop()
    assert watchdog.state == "degraded"
    return watchdog


def test_a_container_stopped_by_hand_is_named_with_the_command_that_brings_it_back(caplog):
    caplog.set_level(logging.INFO, logger="chatloop")
    cluster = FakeCluster({2: CONTAINER})
    watchdog = _lose(cluster, {2: "no answer to the heartbeat within 3 s (EOF: end of file)"})
    bring_back = "`podman start chatloop-worker-2`"

    # While it waits for the worker: the lost stage is named, and how to bring it back is said.
    recovering = cluster.lost_while_recovering[2]
    assert recovering.startswith("worker2 (container chatloop-worker-2): no answer to the heartbeat within 3 s")
    assert ("waiting up to cluster.recovery_timeout_s=60 s for it to rejoin: if its container was stopped by hand "
            f"or exited, bring it back with {bring_back}") in recovering
    assert cluster.rendezvous.evicted == [(2, 1)]

    # After cluster.recovery_timeout_s: the waiting requests end with the container and the command.
    [error] = cluster.listener.unavailable
    assert isinstance(error, ClusterUnavailableError)
    assert ("worker2 (container chatloop-worker-2) did not rejoin the coordinator at coordinator:50050 within "
            "cluster.recovery_timeout_s=60 s: it is not running (stopped by hand, or it exited)") in str(error)
    assert f"stays stopped whatever its restart policy: bring it back with {bring_back}" in str(error)

    # /health's 503 body and chatloop-status say the same.
    reports = RpcCluster.describe(cluster, 1.0)  # type: ignore[arg-type]
    health = HealthReport(reports).as_json()
    assert health["status"] == "unavailable" and health["down"] == ["worker2"]
    down = next(s for s in health["stages"] if s["name"] == "worker2")["error"]
    assert down.startswith("degraded: worker2 (container chatloop-worker-2) did not rejoin") and bring_back in down
    stats = EngineStats(num_waiting=0, num_running=0, num_in_flight=0, last_batch_size=0, generated_tokens=0,
                        cluster_state="degraded")
    status = build_status(stats, HealthReport(reports), model="smollm2")
    node = next(n for n in status["nodes"] if n["name"] == "worker2")
    assert node["container"] == "chatloop-worker-2" and node["state"] == "down"
    row = next(line for line in format_table(status).splitlines() if line.startswith("worker2"))
    assert "chatloop-worker-2" in row and bring_back in row

    # Every log line of the healing names the stage (and the generation).
    lines = [r.getMessage() for r in caplog.records if r.name == "chatloop.runtime.healing"]
    assert lines, caplog.text
    assert all("worker2" in line for line in lines), lines
    assert any(line.startswith("generation 4 lost worker2 (container chatloop-worker-2): no answer to the "
                               "heartbeat within 3 s") for line in lines), lines
    assert any(line.startswith("generation 5: the cluster is degraded, worker2 could not be brought back")
               and bring_back in line for line in lines), lines
    assert str(watchdog.lost[2]) == down.removeprefix("degraded: ")


def test_a_worker_started_by_hand_is_named_with_its_command_and_every_reason_with_its_stage(caplog):
    caplog.set_level(logging.INFO, logger="chatloop")
    cluster = FakeCluster({1: BY_HAND, 3: {"pid": 77, "host": "vm"}})
    _lose(cluster, {1: "no answer: EOF", 3: "unhealthy: its logits are not finite"})
    recovering = cluster.lost_while_recovering
    assert recovering[1].startswith("worker1 (pid 4242 on vm): no answer: EOF; waiting up to")
    assert f"if it is not running, bring it back with `{BY_HAND['command']}`" in recovering[1]
    assert recovering[3] == "worker3 (pid 77 on vm): unhealthy: its logits are not finite"  # no command known
    [error] = cluster.listener.unavailable
    assert (f"worker1 (pid 4242 on vm) did not rejoin the coordinator at coordinator:50050 within "
            f"cluster.recovery_timeout_s=60 s: it is not running (stopped by hand, or it exited) or cannot reach that "
            f"address; start it again with `{BY_HAND['command']}`") in str(error)
    # A worker the coordinator knows no command for: started elsewhere, as the reference starts them.
    assert ("worker3 did not join the coordinator at coordinator:50050 in time (cluster.recovery_timeout_s=60 s): "
            "start each with `chatloop-worker --config configs/worker-config-N.yaml --coordinator "
            "coordinator:50050` (worker N)") in str(error)
    lines = [r.getMessage() for r in caplog.records if r.name == "chatloop.runtime.healing"]
    assert all(re.search(r"\bworker[13]\b", line) for line in lines), lines


def test_what_a_worker_announces_where_it_runs(monkeypatch):
    monkeypatch.delenv(members.CONTAINER_ENV, raising=False)
    monkeypatch.delenv(members.ENGINE_ENV, raising=False)
    plain = members.announcement(["chatloop-worker", "--config", "/a b/worker-config-0.yaml"])
    assert plain["command"] == "chatloop-worker --config '/a b/worker-config-0.yaml'" and "container" not in plain
    assert "command" not in members.announcement()  # started by the coordinator or torchrun: its supervisor restarts
    monkeypatch.setenv(members.CONTAINER_ENV, "chatloop-worker-3")
    monkeypatch.setenv(members.ENGINE_ENV, "podman --runtime runc")
    inside = members.announcement(["chatloop-worker"])
    assert inside["container"] == "chatloop-worker-3" and "command" not in inside
    assert members.bring_back(inside) == "podman --runtime runc start chatloop-worker-3"
    assert members.label(3, inside) == "worker3 (container chatloop-worker-3)"
    monkeypatch.delenv(members.ENGINE_ENV)
    assert members.bring_back(members.announcement()) == "docker start chatloop-worker-3"  # the default engine
    assert members.label(0, None) == "worker0" and members.bring_back(None) is None


@pytest.mark.parametrize("reasons", [None, {1: "worker1: its own"}])
def test_a_generation_error_gives_each_worker_its_reason(reasons):
    e = GenerationError([0, 1], "both", reasons=reasons)
    assert e.reason(0) == "both" and e.reason(1) == (reasons or {}).get(1, "both")
