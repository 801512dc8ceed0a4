"""The watchdog's state machine without processes, network or threads: a fake clock, a fake cluster, fake
generations and fake supervisors; each test drives :meth:`Watchdog.step` and looks at the state, what the listener
heard and what the cluster and its generations were asked to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from chatloop.engine import ClusterUnavailableError
from chatloop.runtime.faults import GenerationError, Loss
from chatloop.runtime.healing import RETRY_S, State, Watchdog

SETTINGS = SimpleNamespace(heartbeat_interval_s=2.0, heartbeat_timeout_s=3.0, recovery_timeout_s=60.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSupervisor:
    """A worker this process started: it exits when told, and is given up after ``max_restarts`` restarts."""

    def __init__(self, index: int, max_restarts: int = 3) -> None:
        self.index, self.name, self.max_restarts = index, f"worker{index}", max_restarts
        self.restarts, self.given_up, self.ended, self.served_count = 0, None, None, 0

    def exited(self) -> Loss | None:
        return self.ended

    def restart(self, reason: Loss) -> bool:
        self.ended = None
        if self.restarts >= self.max_restarts:
            self.given_up = f"{self.name} failed {self.restarts + 1} starts in a row; the last: {reason}"
            return False
        self.restarts += 1
        return True

    def served(self) -> None:
        self.served_count += 1


class FakeGeneration:
    """One generation that forms as its ``outcome`` says: None forms it, a callable runs while it forms (a worker
    exiting meanwhile), a float is how long the workers take to join, an exception fails it."""

    def __init__(self, cluster: FakeCluster, number: int, outcome=None) -> None:
        self.cluster, self.number, self.outcome = cluster, number, outcome
        self.pipeline: str | None = None

    def heartbeat(self) -> dict[int, str]:
        self.cluster.heartbeats += 1
        return dict(self.cluster.silent) if self.pipeline is not None else {}

    def form(self, deadline, on_exit, waited, join_deadline=None) -> None:
        clock = self.cluster.clock
        self.cluster.calls.append(f"form {self.number}")
        joined_by = None if join_deadline is None else join_deadline - clock.now
        self.cluster.deadlines.append((deadline - clock.now, joined_by))
        outcome = self.outcome
        if callable(outcome):
            outcome(on_exit)
        elif isinstance(outcome, float):  # the workers take this long to join
            clock.now += outcome
            if clock.now > (deadline if join_deadline is None else join_deadline):
                raise GenerationError([1], f"worker1 did not join in time ({waited})", named=True)
        elif outcome is not None:
            raise outcome

    def load(self, deadline) -> str:
        self.cluster.calls.append(f"load {self.number}")
        self.pipeline = f"pipeline-{self.number}"
        return self.pipeline

    def leave(self) -> None:
        self.cluster.calls.append(f"leave {self.number}")
        self.pipeline = None


class FakeCluster:
    """Generation 1 serving; the next ones form as ``outcomes`` say, one per try (see :class:`FakeGeneration`)."""

    def __init__(self, clock: Clock, supervisors=(), known=None, outcomes=()) -> None:
        self.clock, self.supervisors, self.known = clock, list(supervisors), dict(known or {})
        self.current = FakeGeneration(self, 1)
        self.current.pipeline = "pipeline-1"
        self.outcomes = list(outcomes)
        self.silent: dict[int, str] = {}
        self.calls: list[str] = []
        self.heartbeats = 0
        self.deadlines: list[tuple[float, float | None]] = []  # (to form and load, to join) from when it began
        self.listener = SimpleNamespace(lost=[], restored=[], unavailable=[])
        self.listener.pipeline_lost = lambda reason: self.listener.lost.append(reason) or 2
        self.listener.pipeline_restored = self.listener.restored.append
        self.listener.pipeline_unavailable = self.listener.unavailable.append

    @property
    def generation(self) -> int:
        return self.current.number

    def begin(self) -> FakeGeneration:
        self.current = FakeGeneration(self, self.current.number + 1, self.outcomes.pop(0) if self.outcomes else None)
        return self.current

    def announced(self, index):
        return self.known.get(index)

    def evict(self, index: int) -> None:
        self.calls.append(f"evict {index}")


def _watchdog(cluster: FakeCluster) -> Watchdog:
    return Watchdog(cluster, SETTINGS, clock=cluster.clock, watch=False)


def test_a_worker_that_exits_is_restarted_and_the_pipeline_rebuilt_in_the_next_generation():
    clock = Clock()
    worker = FakeSupervisor(1)
    cluster = FakeCluster(clock, [FakeSupervisor(0), worker], outcomes=[4.5])  # it rejoins after 4.5 s
    watchdog = _watchdog(cluster)
    watchdog.step()
    assert watchdog.state is State.SERVING and cluster.calls == []
    worker.ended = Loss("worker1 (pid 9) was killed by SIGKILL", "Killed")
    watchdog.step()
    assert watchdog.state is State.SERVING and watchdog.lost == {}
    assert cluster.calls == ["leave 1", "form 2", "load 2"] and cluster.generation == 2
    assert cluster.listener.lost == ["worker1 (pid 9) was killed by SIGKILL"]  # one line, no output tail
    assert cluster.listener.restored == ["pipeline-2"]
    assert watchdog.recoveries == 1 and watchdog.recovery_seconds == [4.5] and watchdog.replays == 2
    assert worker.restarts == 1 and worker.served_count == 1


def test_the_heartbeat_goes_out_only_when_due_and_a_silent_stage_is_named_as_it_announced_itself():
    clock = Clock()
    cluster = FakeCluster(clock, known={2: {"pid": 7, "container": "chatloop-worker-2", "engine": "podman"}},
                          outcomes=[GenerationError([2], "no", named=False)])
    watchdog = _watchdog(cluster)
    watchdog.step()
    assert cluster.heartbeats == 0  # not due yet
    clock.now += SETTINGS.heartbeat_interval_s
    watchdog.step()
    assert cluster.heartbeats == 1 and watchdog.state is State.SERVING
    cluster.silent = {2: "no answer to the heartbeat within 3 s (EOF)"}
    clock.now += 1.0
    watchdog.step()
    assert cluster.heartbeats == 1  # 1 s after the last one: not yet
    clock.now += 1.0
    watchdog.step()
    assert cluster.heartbeats == 2
    assert cluster.listener.lost == ["worker2 (container chatloop-worker-2): no answer to the heartbeat within 3 s "
                                     "(EOF)"]
    # Nobody here restarts it: it is evicted (its torchrun rank replaces it) and the message says how to bring it back.
    assert cluster.calls[:3] == ["leave 1", "evict 2", "form 2"]
    assert watchdog.state is State.DEGRADED and cluster.calls[-1] == "leave 2"  # it never formed
    assert str(watchdog.lost[2]) == "worker2 (container chatloop-worker-2): no"


def test_a_loss_during_recovery_restarts_that_worker_too_and_the_generation_still_forms():
    clock = Clock()
    first, second = FakeSupervisor(0), FakeSupervisor(1)

    def second_exits_while_forming(on_exit) -> None:
        assert on_exit(second, Loss("worker1 (pid 12) exited with code 1")) is True

    cluster = FakeCluster(clock, [first, second], outcomes=[second_exits_while_forming])
    watchdog = _watchdog(cluster)
    first.ended = Loss("worker0 (pid 11) was killed by SIGKILL")
    watchdog.step()
    assert watchdog.state is State.SERVING and (first.restarts, second.restarts) == (1, 1)
    assert cluster.calls == ["leave 1", "form 2", "load 2"]


def test_a_worker_past_max_restarts_is_given_up_and_never_retried():
    clock = Clock()
    worker = FakeSupervisor(1, max_restarts=0)
    cluster = FakeCluster(clock, [worker])
    watchdog = _watchdog(cluster)
    worker.ended = Loss("worker1 (pid 9) exited with code 3", "partition_1.safetensors: no such file")
    watchdog.step()
    assert watchdog.state is State.DEGRADED and worker.given_up is not None
    assert str(watchdog.lost[1]) == worker.given_up and "no such file" in worker.given_up
    [error] = cluster.listener.unavailable
    assert isinstance(error, ClusterUnavailableError) and str(error).startswith("worker1 could not be brought back")
    assert cluster.calls == ["leave 1"]  # no generation is formed with a worker given up
    clock.now += 10 * RETRY_S
    watchdog.step()
    assert cluster.calls == ["leave 1"] and watchdog.state is State.DEGRADED


def test_a_worker_given_up_while_the_generation_forms_degrades_it():
    clock = Clock()
    first, second = FakeSupervisor(0), FakeSupervisor(1, max_restarts=0)
    cluster = FakeCluster(clock, [first, second],
                          outcomes=[lambda on_exit: on_exit(second, Loss("worker1 (pid 5) exited with code 3"))])
    watchdog = _watchdog(cluster)
    first.ended = Loss("worker0 (pid 4) was killed by SIGKILL")
    watchdog.step()
    assert watchdog.state is State.DEGRADED and list(watchdog.lost) == [1]
    assert cluster.calls == ["leave 1", "form 2", "leave 2"] and cluster.generation == 2


def test_past_recovery_timeout_it_degrades_and_a_host_that_comes_back_is_taken_back_at_a_retry():
    clock = Clock()
    cluster = FakeCluster(clock, known={1: {"pid": 33, "host": "b"}},
                          outcomes=[SETTINGS.recovery_timeout_s + 1,
                                    GenerationError([1], "worker1 could not load its stage: EOF", named=True), 0.5])
    watchdog = _watchdog(cluster)
    watchdog.report({1: "no answer: EOF"}, generation=1)
    watchdog.step()
    assert watchdog.state is State.DEGRADED and cluster.generation == 2
    assert str(watchdog.lost[1]).startswith("worker1 did not join in time (cluster.recovery_timeout_s=60 s)")
    [error] = cluster.listener.unavailable
    assert "worker1" in str(error)
    watchdog.step()  # a retry is due at once; the host is still away
    assert watchdog.state is State.DEGRADED and cluster.calls[-2:] == ["form 3", "leave 3"]
    assert len(cluster.listener.unavailable) == 1  # a failed retry does not say it all again
    clock.now += 1.0
    watchdog.step()
    assert cluster.calls[-1] == "leave 3"  # not yet time for the next retry
    clock.now += RETRY_S
    watchdog.step()
    assert watchdog.state is State.SERVING and watchdog.lost == {} and cluster.calls[-2:] == ["form 4", "load 4"]
    assert cluster.listener.restored == ["pipeline-4"]
    # The first try waits the recovery time; a retry waits RETRY_S for the workers to join, then gives starting RPC
    # and loading the whole recovery time (a busy host takes longer than a retry's wait).
    assert cluster.deadlines == [(60.0, None), (60.0, RETRY_S), (60.0, RETRY_S)]


def test_a_lost_coordinator_link_reported_by_a_step_heals_and_stale_news_is_ignored():
    clock = Clock()
    cluster = FakeCluster(clock, known={0: {"pid": 21, "host": "a"}})
    watchdog = _watchdog(cluster)
    watchdog.report({0: "no answer: connection closed"}, generation=0)  # about a generation rebuilt since
    watchdog.step()
    assert watchdog.state is State.SERVING and cluster.calls == []
    watchdog.report({0: "no answer: connection closed"}, generation=1)
    watchdog.step()
    assert watchdog.state is State.SERVING and cluster.calls == ["leave 1", "evict 0", "form 2", "load 2"]
    assert cluster.listener.lost == ["worker0 (pid 21 on a): no answer: connection closed"]


def test_a_stopped_watchdog_does_not_heal():
    clock = Clock()
    worker = FakeSupervisor(0)
    cluster = FakeCluster(clock, [worker])
    watchdog = _watchdog(cluster)
    watchdog.stop()
    worker.ended = Loss("worker0 (pid 3) was killed by SIGTERM")
    watchdog.step()
    assert watchdog.state is State.SERVING and cluster.calls == [] and worker.restarts == 0


def test_the_watchdog_refuses_a_transition_it_does_not_make():
    watchdog = _watchdog(FakeCluster(Clock()))
    with pytest.raises(AssertionError, match="from State.SERVING to State.DEGRADED|from serving to degraded"):
        watchdog._to(State.DEGRADED, {})
