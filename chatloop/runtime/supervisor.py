"""Keeping one worker process alive: start it, start it again when it dies, give up after a limit and say why.

The coordinator supervises the workers it starts on one host; under torchrun each worker rank's
process supervises its worker (a child process), so that a killed worker comes back without
torchrun tearing the whole group down. A worker that lost the coordinator (a network outage)
exits with ``EXIT_COORDINATOR_LOST`` and is started again without counting; one that keeps dying
for other reasons (a bad partition, out of memory) is given up after ``max_restarts`` failed starts
in a row, and the reason (its exit status and last output lines) is kept for health and status.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..config import API_KEY_ENV, ChatLoopConfig
from ..engine.pipeline import stage_name
from ..worker_settings import worker_environment
from .faults import Loss
from .processes import WorkerProcess

__all__ = ["EXIT_COORDINATOR_LOST", "WorkerSupervisor", "supervise_forever"]

log = logging.getLogger(__name__)

EXIT_COORDINATOR_LOST = 75
"""A worker's exit status when it lost the coordinator's store (EX_TEMPFAIL): started again, not counted."""
STABLE_S = 60.0
"""A worker that ran this long before it died counts as having started fine: its failures in a row start over."""


class WorkerSupervisor:
    """Worker ``index``'s process, restarted on demand, with the count of failed starts in a row."""

    def __init__(self, index: int, arguments: list[str], env: dict[str, str], max_restarts: int) -> None:
        self.index = index
        self.name = stage_name(index)
        self.arguments = arguments
        self.env = env
        self.max_restarts = max_restarts
        self.attempt = 0
        """Starts so far (0: the first)."""
        self.failures_in_a_row = 0
        self.restarts = 0
        self.given_up: str | None = None
        """Why the worker is not started again any more (None while it is)."""
        self.process: WorkerProcess | None = None
        self.closed = False
        """The service is stopping: the worker is not started again."""

    @classmethod
    def for_worker(cls, cfg: ChatLoopConfig, index: int, config_file: str | Path, coordinator: str) -> WorkerSupervisor:
        """Worker ``index`` of ``cfg`` (written to ``config_file``) joining ``coordinator`` (host:port, or
        ``torchrun``), a child of this process: the one way a worker process is started, by the coordinator on one
        host and by a torchrun rank."""
        env = {**os.environ, **worker_environment(cfg.worker)}  # read when the worker imports torch
        env.pop(API_KEY_ENV, None)  # a worker has no use for the HTTP key
        arguments = ["--index", str(index), "--config", str(config_file), "--coordinator", coordinator,
                     "--parent-pid", str(os.getpid())]
        return cls(index, arguments, env, cfg.cluster.max_restarts)

    def start(self) -> WorkerProcess:
        env = {**self.env, "CHATLOOP_WORKER_INDEX": str(self.index), "CHATLOOP_WORKER_ATTEMPT": str(self.attempt)}
        self.process = WorkerProcess(self.index, self.arguments, env)
        self.attempt += 1
        return self.process

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exited(self) -> Loss | None:
        """How its process ended ('worker1 (pid 12) was killed by SIGKILL', with its last output); None: running."""
        if self.process is None or self.process.poll() is None:
            return None
        return Loss(f"{self.name} (pid {self.process.pid}) {self.process.exit_description()}", self.process.tail())

    def kill(self) -> None:
        """Stop it now (SIGKILL): a worker that stopped answering must not come back to a later generation."""
        if self.process is not None and self.process.poll() is None:
            self.process.process.kill()
            self.process.stop(timeout_s=1)

    def restart(self, reason: Loss, counted: bool = True) -> bool:
        """Start it again after it failed (``reason``); False, and :attr:`given_up` set, past the limit (or, once the
        service is stopping, False and nothing started)."""
        ran_for = time.monotonic() - self.process.started if self.process is not None else 0.0
        self.kill()
        if self.closed:
            return False
        if ran_for > STABLE_S:
            self.failures_in_a_row = 0
        if counted:
            self.failures_in_a_row += 1
        if self.failures_in_a_row > self.max_restarts:
            self.given_up = (f"{self.name} failed {self.failures_in_a_row} starts in a row "
                             f"(cluster.max_restarts={self.max_restarts}); the last: {reason}")
            log.error("%s", self.given_up)
            return False
        self.restarts += 1
        log.warning("%s: starting it again (restart %d, %d failed in a row): %s", self.name, self.restarts,
                    self.failures_in_a_row, reason.reason)
        self.start()
        return True

    def served(self) -> None:
        """It joined a generation that formed: the failures in a row start from zero again."""
        self.failures_in_a_row = 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout_s=2)


def supervise_forever(supervisor: WorkerSupervisor, closed: Callable[[], bool], evicted: Callable[[int], bool],
                      report: Callable[[str], None], poll_s: float = 0.2) -> int:
    """A torchrun rank's loop: keep ``supervisor``'s worker running until the service closes (then return 0).

    ``closed()`` and ``evicted(pid)`` ask the coordinator's store; ``report(reason)`` tells it why the
    worker is given up. A given-up worker's rank stays alive (exiting would make torchrun stop every
    rank, the coordinator included) until the service closes.
    """
    supervisor.start()
    while True:
        time.sleep(poll_s)
        try:
            if closed():
                supervisor.stop()
                return 0
            pid = supervisor.pid
            if pid is not None and supervisor.given_up is None and evicted(pid):
                log.warning("%s (pid %d) was evicted by the coordinator: killing it", supervisor.name, pid)
                supervisor.kill()
        except (RuntimeError, OSError) as e:  # the store is out of reach for now: keep the worker, ask again
            log.debug("store: %s", e)
            continue
        if supervisor.given_up is not None:
            continue
        ended = supervisor.exited()
        if ended is None:
            continue
        lost_coordinator = supervisor.process is not None and supervisor.process.poll() == EXIT_COORDINATOR_LOST
        if not supervisor.restart(ended, counted=not lost_coordinator):
            try:
                report(supervisor.given_up or str(ended))
            except (RuntimeError, OSError):
                pass
        elif lost_coordinator:
            time.sleep(1.0)  # the coordinator's host is out of reach: do not spin
