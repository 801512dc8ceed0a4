"""Self-healing: notice a lost worker within seconds, rebuild the pipeline in a new generation, replay.

A worker is lost when its process exits (the ones the coordinator started: seen within 0.2 s),
when it does not answer a heartbeat (``cluster.heartbeat_interval_s`` / ``heartbeat_timeout_s``: a
stopped process or a cut cable, within ~4 s by default), when a step finds it silent, or when its
compute thread has been on one micro-batch for longer than ``cluster.progress_deadline_s``. Then:

1. the scheduler stops launching and requeues every running sequence (nothing is lost: the
   coordinator has every token), and the current generation ends on every rank;
2. the lost workers are killed (a stopped one must not come back into a later generation) and
   started again: by the coordinator on one host, by their supervisor under torchrun;
3. a new generation forms with the survivors (which keep their loaded stages) and the
   replacements, within ``cluster.recovery_timeout_s``;
4. the sequences are prefilled again from their prompt and the tokens they had, and their
   streams go on: clients see a delay.

A worker started ``cluster.max_restarts`` times in a row without coming back is given up: the
service stays degraded and says why. A worker that does not come back in time (its host is gone)
makes the waiting requests fail with a 503 naming it; the coordinator keeps trying, and takes the
stage back when it returns. A worker nobody here restarts (started by hand, or in a container: one stopped
by hand stays stopped whatever its restart policy) is named with what it said when it joined, and every
message about it says how to bring it back (``docker start chatloop-worker-2``: :mod:`.members`).

Every log line names the stages it is about and the generation.

The watchdog is a state machine (:class:`State`) over a narrow interface to the cluster (:class:`Generations`: the
current generation, begin the next) and to one generation (:class:`GenerationLike`: form, load, leave): its thread
calls :meth:`Watchdog.step` every 0.2 s, and tests call it with a fake clock, a fake cluster and fake generations.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Protocol

from ..engine import ClusterUnavailableError
from ..engine.pipeline import stage_name
from .faults import GenerationError, Loss, summary
from .members import label, while_away
from .supervisor import WorkerSupervisor

__all__ = ["GenerationLike", "Generations", "State", "Watchdog"]

log = logging.getLogger(__name__)

POLL_S = 0.2
RETRY_S = 5.0
"""While degraded, how often the coordinator tries to form the pipeline again."""


class State(str, Enum):
    """The cluster's state, as the watchdog keeps it (its value is what /v1/status and the metrics show)."""

    SERVING = "serving"
    RECOVERING = "recovering"
    """A lost worker is being replaced: requests wait."""
    DEGRADED = "degraded"
    """A lost worker did not come back in time: requests are refused, the coordinator keeps trying."""


NEXT_STATES = {
    State.SERVING: {State.RECOVERING},
    State.RECOVERING: {State.SERVING, State.DEGRADED},
    State.DEGRADED: {State.SERVING, State.DEGRADED},
}
"""The transitions the watchdog makes (degraded to degraded: a retry that failed for a new reason)."""


class GenerationLike(Protocol):
    """What the watchdog needs of one generation (:class:`~chatloop.runtime.generation.Generation`): one RPC world,
    formed, loaded and left once."""

    number: int
    pipeline: Any
    """Its pipeline once loaded (None before, and once left)."""

    def heartbeat(self) -> dict[int, str]:
        """{stage: why} for its stages that give no sign of life ({} without a pipeline)."""

    def form(self, deadline: float, on_exit: Callable[[WorkerSupervisor, Loss], bool], waited: str,
             join_deadline: float | None = None) -> None:
        """Wait for every worker (until ``join_deadline``), start RPC; GenerationError if it cannot by ``deadline``."""

    def load(self, deadline: float) -> Any:
        """Every worker builds or keeps its stage, chained into its pipeline; GenerationError if one cannot."""

    def leave(self) -> None:
        """End it, formed or not: its steps fail, the workers move on to the next, this rank's RPC agent goes."""


class Generations(Protocol):
    """What the watchdog needs of the cluster (:class:`~chatloop.runtime.cluster.RpcCluster`): the current
    generation, a way to begin the next, the workers this process supervises and what the others announced."""

    current: GenerationLike
    supervisors: list[WorkerSupervisor]
    listener: Any
    """A :class:`~chatloop.runtime.cluster.ClusterListener`, or None."""

    def begin(self) -> GenerationLike:
        """The next generation (numbered one past the current), not yet formed; from now on the current one."""

    def announced(self, index: int) -> Mapping[str, Any] | None:
        """What worker ``index`` said when it last joined (pid, host, container, command)."""

    def evict(self, index: int) -> None:
        """Tell worker ``index``'s supervisor elsewhere (torchrun's rank) to replace it."""


class Watchdog:
    """The coordinator's thread that watches the workers and heals the cluster (see the module's docstring).

    ``settings``: ``cluster.heartbeat_interval_s``, ``heartbeat_timeout_s``, ``recovery_timeout_s``; ``clock``:
    seconds (monotonic); ``watch``: start the thread (tests drive :meth:`step` themselves).
    """

    def __init__(self, cluster: Generations, settings: Any, clock: Callable[[], float] = time.monotonic,
                 watch: bool = True) -> None:
        self.cluster = cluster
        self.settings = settings
        self.clock = clock
        self.state = State.SERVING
        self.lost: dict[int, Loss] = {}
        """While recovering or degraded: the lost stages and why."""
        self.recoveries = 0
        self.recovery_seconds: list[float] = []
        """From noticing the loss to the rebuilt pipeline, per recovery."""
        self.replays = 0
        self.last_noticed: float | None = None
        """When (``clock()``) the last loss was noticed."""
        self._reports: queue.SimpleQueue[tuple[int, dict[int, str]]] = queue.SimpleQueue()
        self._next_heartbeat = clock() + settings.heartbeat_interval_s
        self._next_retry = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chatloop-watchdog", daemon=True)
        if watch:
            self._thread.start()

    @property
    def restarts(self) -> dict[str, int]:
        return {s.name: s.restarts for s in self.cluster.supervisors}

    def report(self, lost: dict[int, str], generation: int) -> None:
        """Something else found stages lost in ``generation`` (a step that could not reach them): {stage: why, not
        naming the stage}."""
        self._reports.put((generation, lost))
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop watching; a recovery under way gives up (the cluster's ``closing`` ends its waits), and nothing is
        started again. Waits up to ``timeout_s`` for the thread (a daemon: shutdown goes on without it)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def step(self) -> None:
        """One look: while serving, at what was reported, the exits and (when due) a heartbeat, and heal a loss;
        while degraded, try again every ``RETRY_S`` to form the pipeline (unless a worker is given up)."""
        now = self.clock()
        if self.state is State.SERVING:
            heartbeat = now >= self._next_heartbeat
            if heartbeat:
                self._next_heartbeat = now + self.settings.heartbeat_interval_s
            lost = self._look(heartbeat)
            if lost:
                self._heal(lost)
        elif self.state is State.DEGRADED and now >= self._next_retry:
            self._next_retry = now + RETRY_S
            if not any(s.given_up for s in self.cluster.supervisors if s.index in self.lost):
                # The workers get RETRY_S to be there; once they all are, starting RPC and loading the stages get
                # the whole recovery time (on a busy host they can take longer than a retry's wait).
                self._rebuild(now, now + self.settings.recovery_timeout_s, quiet=True,
                              waited=f"{RETRY_S:g} s (a retry)", join_deadline=now + RETRY_S)

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.step()
            except Exception:  # the watchdog must never die
                log.exception("the watchdog failed (%s, generation %d%s); it goes on", self.state.value,
                              self.cluster.current.number, f", lost: {_names(self.lost)}" if self.lost else "")

    def _to(self, state: State, lost: dict[int, Loss]) -> None:
        assert state in NEXT_STATES[self.state], f"the watchdog does not go from {self.state} to {state}"
        self.state, self.lost = state, dict(lost)

    def _supervisor(self, index: int) -> WorkerSupervisor | None:
        return next((s for s in self.cluster.supervisors if s.index == index), None)

    def _look(self, heartbeat: bool) -> dict[int, Loss]:
        """Stages lost now: reported, exited, silent to a heartbeat, or holding up the oldest step."""
        lost: dict[int, Loss] = {}
        while not self._reports.empty():
            generation, reported = self._reports.get()
            if generation == self.cluster.current.number:  # news of an earlier generation is stale: it was rebuilt
                lost.update({k: self._loss(k, why) for k, why in reported.items()})
        for supervisor in self.cluster.supervisors:
            ended = supervisor.exited()
            if ended is not None:
                lost[supervisor.index] = ended
        if heartbeat and not lost:
            lost.update({k: self._loss(k, why) for k, why in self.cluster.current.heartbeat().items()})
        return lost

    def _loss(self, index: int, why: str) -> Loss:
        """``why`` about stage ``index``, named as it announced itself: 'worker2 (container chatloop-worker-2): no
        answer to the heartbeat within 3 s (...)'."""
        return Loss.of(index, self.cluster.announced(index), why)

    def _heal(self, lost: dict[int, Loss]) -> None:
        if self._stop.is_set():  # the service is stopping: what it stops is not lost
            return
        cluster, listener = self.cluster, self.cluster.listener
        started = self.last_noticed = self.clock()
        self._to(State.RECOVERING, lost)
        reason = summary(lost)
        log.error("generation %d lost %s: rebuilding the pipeline", cluster.current.number, reason)
        if listener is not None:
            self.replays += listener.pipeline_lost(reason)
        cluster.current.leave()
        waited = f"cluster.recovery_timeout_s={self.settings.recovery_timeout_s:g} s"
        for k, why in lost.items():
            supervisor = self._supervisor(k)
            if supervisor is not None:
                if not supervisor.restart(why):
                    self.lost[k] = Loss(supervisor.given_up) if supervisor.given_up else why
                continue
            info = cluster.announced(k) or {}  # started by torchrun (or by hand): replaced by whoever started it
            try:
                cluster.evict(k)
            except Exception as e:
                log.warning("generation %d: could not evict %s: %s", cluster.current.number, label(k, info), e)
            hint = while_away(info, waited)
            if hint is not None:  # nobody here restarts it: say how to
                self.lost[k] = why.hinted(hint)
        if any(s.given_up for s in cluster.supervisors):
            self._degrade(self.lost)
            return
        self._rebuild(started, started + self.settings.recovery_timeout_s, waited=waited)

    def _rebuild(self, started: float, deadline: float, quiet: bool = False, waited: str = "the time allowed",
                 join_deadline: float | None = None) -> None:
        """Form the next generation and load it; on success carry on, else stay (or become) degraded."""
        cluster = self.cluster
        if self._stop.is_set():
            return
        generation = cluster.begin()
        try:
            generation.form(deadline, on_exit=self._restart_exited, waited=waited, join_deadline=join_deadline)
            generation.load(deadline)
        except GenerationError as e:
            generation.leave()
            if self._stop.is_set():
                return
            if not quiet or self.state is not State.DEGRADED:
                self._degrade({k: e.loss(k, cluster.announced(k)) for k in e.indices})
            return
        for supervisor in cluster.supervisors:
            supervisor.served()
        seconds = self.clock() - started
        self.recoveries += 1
        self.recovery_seconds.append(seconds)
        back = _names(self.lost)
        self._to(State.SERVING, {})
        log.warning("generation %d: %s rejoined, the pipeline is back after %.1f s", generation.number, back, seconds)
        if cluster.listener is not None:
            cluster.listener.pipeline_restored(generation.pipeline)

    def _restart_exited(self, supervisor: WorkerSupervisor, ended: Loss) -> bool:
        """A worker this process started exited while a generation formed: start it again, or give it up."""
        if supervisor.restart(ended):
            return True
        raise GenerationError([supervisor.index], supervisor.given_up or str(ended), named=True)

    def _degrade(self, lost: dict[int, Loss]) -> None:
        self._to(State.DEGRADED, lost)
        reason = summary(lost)
        log.error("generation %d: the cluster is degraded, %s could not be brought back: %s",
                  self.cluster.current.number, _names(lost), reason)
        if self.cluster.listener is not None:
            self.cluster.listener.pipeline_unavailable(ClusterUnavailableError(
                f"{_names(lost)} could not be brought back: {reason}"))


def _names(lost: Mapping[int, Loss]) -> str:
    """'worker1, worker3'."""
    return ", ".join(stage_name(k) for k in sorted(lost))
