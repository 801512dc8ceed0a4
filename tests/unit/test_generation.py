"""One generation (one RPC world) without RPC: what leaving it does, formed or not, how its forming gives up, and how
the cluster hands each generation the coordinator's listener and numbers them."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from chatloop.engine import StageLostError
from chatloop.runtime import generation as generation_module
from chatloop.runtime.cluster import RpcCluster
from chatloop.runtime.faults import GenerationError
from chatloop.runtime.generation import Generation

CFG = SimpleNamespace(cluster=SimpleNamespace(num_workers=2, startup_timeout_s=30.0, launch="external",
                                              heartbeat_timeout_s=3.0))


class FakeStore:
    """The rendezvous: which generations were opened and ended; ``ready`` the workers that announced themselves."""

    where = "coordinator:50050"

    def __init__(self, ready=None) -> None:
        self.opened: list[int] = []
        self.ended: list[int] = []
        self._ready = dict(ready or {})

    def open_generation(self, generation: int) -> None:
        self.opened.append(generation)

    def ready(self, generation: int, num_workers: int) -> dict:
        return dict(self._ready)

    def end(self, generation: int) -> None:
        self.ended.append(generation)

    def failure(self, index: int) -> str | None:
        return None


@pytest.fixture
def rpc_shutdowns(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    monkeypatch.setattr(generation_module, "shutdown_rpc",
                        lambda graceful, timeout_s=10.0: calls.append(graceful) or True)
    return calls


def test_leaving_a_generation_that_never_formed_ends_it_in_the_store_and_leaves_rpc_alone(rpc_shutdowns):
    store = FakeStore()
    generation = Generation(3, CFG, store, partitions_dir="unused")  # type: ignore[arg-type]
    generation.leave()
    generation.leave()  # once only
    assert store.ended == [3] and rpc_shutdowns == []


def test_leaving_a_formed_generation_fails_its_steps_in_flight_and_takes_this_ranks_agent_down(rpc_shutdowns):
    store = FakeStore()
    generation = Generation(5, CFG, store, partitions_dir="unused")  # type: ignore[arg-type]
    generation.rpc_up = True  # as form() leaves it
    step = generation.results.expect(41)
    generation.leave()
    with pytest.raises(StageLostError, match="the pipeline of generation 5 was lost") as lost:
        step.result(timeout=1)
    assert lost.value.generation == 5
    generation.results.deliver(41, [7])  # a late answer of the generation that ended goes nowhere
    assert store.ended == [5] and rpc_shutdowns == [False] and not generation.rpc_up


def test_forming_gives_up_when_the_service_stops_and_names_the_workers_that_never_joined():
    closing = threading.Event()
    closing.set()
    store = FakeStore(ready={0: {"pid": 5, "host": "a"}})
    with pytest.raises(GenerationError, match="the service is stopping") as stopping:
        Generation(1, CFG, store, partitions_dir="unused", closing=closing).form(  # type: ignore[arg-type]
            time.monotonic() + 30, on_exit=lambda s, e: True)
    assert stopping.value.indices == [1] and store.opened == [1]

    known: dict[int, dict] = {}
    late = Generation(2, CFG, store, partitions_dir="unused", known=known)  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match=r"worker1 did not join the coordinator at coordinator:50050 in time "
                                              r"\(a test's 0 s\): start each with `chatloop-worker") as missing:
        late.form(time.monotonic() + 30, on_exit=lambda s, e: True, waited="a test's 0 s",
                  join_deadline=time.monotonic())
    assert missing.value.indices == [1] and known == {0: {"pid": 5, "host": "a"}}  # what worker0 said is kept
    assert late.members == {} and not late.rpc_up


def test_the_cluster_numbers_its_generations_and_delivers_to_the_current_one(rpc_shutdowns):
    cluster = RpcCluster(CFG, FakeStore(), "unused")  # type: ignore[arg-type]
    try:
        first = cluster.begin()
        step = first.results.expect(1)
        cluster._serve_link("deliver", (1, [11]))
        assert step.result(timeout=1) == [11]
        first.leave()
        second = cluster.begin()
        assert (first.number, second.number, cluster.generation) == (0, 1, 1)
        assert second.listener is first.listener  # the coordinator's listener outlives a generation
        again = second.results.expect(1)  # micro-batch ids go on across generations; each has its own registry
        cluster._serve_link("deliver", (1, [12]))
        assert again.result(timeout=1) == [12]
    finally:
        if cluster.link_listener is not None:
            cluster.link_listener.close()
