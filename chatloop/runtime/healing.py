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
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from typing import TYPE_CHECKING

from ..engine import ClusterUnavailableError
from .members import label, while_away
from .rendezvous import shutdown_rpc
from .supervisor import WorkerSupervisor

if TYPE_CHECKING:
    from .cluster import RpcCluster

__all__ = ["Watchdog"]

log = logging.getLogger(__name__)

POLL_S = 0.2
RETRY_S = 5.0
"""While degraded, how often the coordinator tries to form the pipeline again."""


class Watchdog:
    """The coordinator's thread that watches the workers and heals the cluster (see the module's docstring)."""

    def __init__(self, cluster: RpcCluster) -> None:
        self.cluster = cluster
        self.state = "serving"
        """serving, recovering (a lost worker is being replaced) or degraded (it did not come back in time)."""
        self.lost: dict[int, str] = {}
        """While recovering or degraded: the lost stages and why."""
        self.recoveries = 0
        self.recovery_seconds: list[float] = []
        """From noticing the loss to the rebuilt pipeline, per recovery."""
        self.replays = 0
        self.last_noticed: float | None = None
        """When (time.monotonic()) the last loss was noticed."""
        self._reports: queue.SimpleQueue[tuple[int, dict[int, str]]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rpc_up = True  # this rank's RPC agent belongs to a formed generation
        self._thread = threading.Thread(target=self._run, name="chatloop-watchdog", daemon=True)
        self._thread.start()

    @property
    def restarts(self) -> dict[str, int]:
        return {s.name: s.restarts for s in self.cluster.supervisors}

    def report(self, lost: dict[int, str], generation: int) -> None:
        """Something else found stages lost in ``generation`` (a step that could not reach them)."""
        self._reports.put((generation, lost))
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop watching; a recovery under way gives up (the cluster's ``closing`` ends its waits), and nothing is
        started again. Waits up to ``timeout_s`` for the thread (a daemon: shutdown goes on without it)."""
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        cfg = self.cluster.cfg.cluster
        next_heartbeat = time.monotonic() + cfg.heartbeat_interval_s
        next_retry = 0.0
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self.state == "serving":
                    lost = self._look(time.monotonic() >= next_heartbeat)
                    if time.monotonic() >= next_heartbeat:
                        next_heartbeat = time.monotonic() + cfg.heartbeat_interval_s
                    if lost:
                        self._heal(lost)
                elif self.state == "degraded" and time.monotonic() >= next_retry:
                    next_retry = time.monotonic() + RETRY_S
                    if all(self._supervisor(k) is None or self._supervisor(k).given_up is None for k in self.lost):
                        self._rebuild(time.monotonic(), time.monotonic() + RETRY_S, quiet=True,
                                      waited=f"{RETRY_S:g} s (a retry)")
            except Exception:  # the watchdog must never die
                log.exception("the watchdog failed (%s, generation %d%s); it goes on", self.state,
                              self.cluster.generation, f", lost: {_names(self.lost)}" if self.lost else "")

    def _supervisor(self, index: int) -> WorkerSupervisor | None:
        return next((s for s in self.cluster.supervisors if s.index == index), None)

    def _look(self, heartbeat: bool) -> dict[int, str]:
        """Stages lost now: reported, exited, silent to a heartbeat, or holding up the oldest step."""
        cfg, pipeline = self.cluster.cfg.cluster, self.cluster.pipeline
        lost: dict[int, str] = {}
        while not self._reports.empty():
            generation, reported = self._reports.get()
            if generation == self.cluster.generation:  # news of an earlier generation is stale: it was rebuilt
                lost.update(reported)
        for supervisor in self.cluster.supervisors:
            ended = supervisor.exited()
            if ended is not None:
                lost[supervisor.index] = ended
        if pipeline is None or lost:
            return lost
        if heartbeat:
            lost.update(pipeline.heartbeat(cfg.heartbeat_timeout_s))
        return lost

    def _named(self, index: int, why: str) -> str:
        """``why`` as a sentence about its stage: 'worker2 (container chatloop-worker-2): no answer to the heartbeat
        within 3 s (...)'; a reason that names its stage already ('worker1 (pid 9) was killed by SIGKILL') stays."""
        if re.match(rf"worker{index}\b", why):
            return why
        return f"{label(index, self.cluster.known.get(index))}: {why}"

    def _heal(self, lost: dict[int, str]) -> None:
        if self._stop.is_set():  # the service is stopping: what it stops is not lost
            return
        cluster, listener = self.cluster, self.cluster.listener
        started = self.last_noticed = time.monotonic()
        lost = {k: self._named(k, why) for k, why in lost.items()}
        self.state, self.lost = "recovering", dict(lost)
        reason = _summary(lost)
        log.error("generation %d lost %s: rebuilding the pipeline", cluster.generation, reason)
        if listener is not None:
            self.replays += listener.pipeline_lost(reason)
        cluster.leave_generation()
        self._rpc_up = False
        waited = f"cluster.recovery_timeout_s={cluster.cfg.cluster.recovery_timeout_s:g} s"
        for k, why in lost.items():
            supervisor = self._supervisor(k)
            if supervisor is not None:
                if not supervisor.restart(why):
                    self.lost[k] = supervisor.given_up or why
            else:  # started by torchrun (or by hand): its supervisor replaces it once evicted
                info = cluster.known.get(k) or cluster.members.get(k) or {}
                if info.get("pid") is not None:
                    try:
                        cluster.rendezvous.evict(k, int(info["pid"]))
                    except Exception as e:
                        log.warning("generation %d: could not evict %s: %s", cluster.generation, label(k, info), e)
                hint = while_away(info, waited)
                if hint is not None:  # nobody here restarts it: say how to
                    self.lost[k] = f"{why}; {hint}"
        if any(s.given_up for s in cluster.supervisors):
            self._degrade(self.lost)
            return
        self._rebuild(started, started + cluster.cfg.cluster.recovery_timeout_s, waited=waited)

    def _rebuild(self, started: float, deadline: float, quiet: bool = False, waited: str = "the time allowed") -> None:
        """Form the next generation and load it; on success carry on, else stay (or become) degraded."""
        from .cluster import GenerationError

        cluster = self.cluster
        if self._stop.is_set():
            return
        generation = cluster.generation + 1
        try:
            cluster.form(generation, deadline, on_exit=self._restart_exited, waited=waited)
            self._rpc_up = True
            cluster.load_stages(deadline)
        except GenerationError as e:
            cluster.rendezvous.end(generation)  # workers waiting to start it move on to the next
            cluster.generation = generation
            if self._rpc_up:
                shutdown_rpc(graceful=False, timeout_s=10)
                self._rpc_up = False
            if self._stop.is_set():
                return
            if not quiet or self.state != "degraded":
                self._degrade({k: e.reason(k) for k in e.indices})
            return
        for supervisor in cluster.supervisors:
            supervisor.served()
        seconds = time.monotonic() - started
        self.recoveries += 1
        self.recovery_seconds.append(seconds)
        back = _names(self.lost)
        self.state, self.lost = "serving", {}
        log.warning("generation %d: %s rejoined, the pipeline is back after %.1f s", generation, back, seconds)
        if cluster.listener is not None:
            cluster.listener.pipeline_restored(cluster.pipeline)

    def _restart_exited(self, supervisor: WorkerSupervisor, ended: str) -> bool:
        from .cluster import GenerationError

        if supervisor.restart(ended):
            return True
        raise GenerationError([supervisor.index], supervisor.given_up or ended)

    def _degrade(self, lost: dict[int, str]) -> None:
        lost = {k: self._named(k, why) for k, why in lost.items()}
        self.state, self.lost = "degraded", dict(lost)
        reason = _summary(lost)
        log.error("generation %d: the cluster is degraded, %s could not be brought back: %s",
                  self.cluster.generation, _names(lost), reason)
        if self.cluster.listener is not None:
            self.cluster.listener.pipeline_unavailable(ClusterUnavailableError(
                f"{_names(lost)} could not be brought back: {reason}"))


def _names(lost: dict[int, str]) -> str:
    """'worker1, worker3'."""
    return ", ".join(f"worker{k}" for k in sorted(lost))


def _summary(lost: dict[int, str]) -> str:
    """'worker2 (pid 9) was killed by SIGKILL' for each lost stage: first lines, without the output tails (a reason
    shared by several stages once)."""
    firsts = (why.splitlines()[0].split("; its last output")[0] for _, why in sorted(lost.items()))
    return "; ".join(dict.fromkeys(firsts))
