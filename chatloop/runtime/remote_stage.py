"""A worker's stage: it computes and forwards to the next stage; the last one answers the coordinator.

A :class:`RemoteStage` lives in a worker process, held by its :class:`~chatloop.runtime.worker_host.WorkerHost`,
through which the coordinator's RPC calls reach it (by the worker's name); it is kept from one generation to the
next while it is the same stage and healthy.

Micro-batches themselves travel over the pipeline's links (:mod:`.links`), not RPC: a ``forward``
message queues one for the stage's own thread, which computes it and sends it on, so any number
of micro-batches can be in flight. The last stage sends the sampled token ids straight to the
coordinator (``deliver``). Nothing is answered on a link: a stage whose compute fails, or whose
link onwards closes, tells the coordinator on a link of its own to the coordinator's listener (``failed``,
:class:`~chatloop.runtime.results.Results`), naming itself.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ..engine import StageError, StageLostError, StageReport, StageTiming
from ..engine.pipeline import compute_thread
from ..models import StepBatch
from ..network import local_addresses, runs_here
from ..stage import StageRunner, StageSpec, build_stage_runner, fault_injection
from .links import Link
from .results import COORDINATOR

__all__ = ["MAX_TRACKED", "RemoteStage"]

log = logging.getLogger(__name__)

MAX_TRACKED = 4096
"""Micro-batches whose progress a stage remembers (the coordinator asks about recent ones only)."""


class RemoteStage:
    """Lives on a worker (made by :meth:`WorkerHost.create_stage`); holds the stage runner and its thread.

    It remembers where each recent micro-batch is (queued, computing, forwarded, done, failed,
    cancelled), so that the coordinator can tell which stage a late step is stuck at, and it
    skips the micro-batches the coordinator cancelled.
    """

    def __init__(self, spec: StageSpec, rpc_timeout_s: float,
                 observers: list[Callable[[dict], None]] | None = None) -> None:
        if spec.host and not runs_here(spec.host):
            raise ValueError(
                f"{spec.name} is configured to run on {spec.host!r} (cluster.workers[{spec.index}].host), "
                "but this rank "
                f"runs on {socket.gethostname()} ({', '.join(sorted(local_addresses()))}): start rank {spec.index + 1} "
                f"on {spec.host}, or change the host in the configuration"
            )
        self.spec = spec
        self.name = spec.name
        self._executor = compute_thread(spec.name)  # builds the stage and its KV pool too: see compute_thread
        self.runner: StageRunner = self._executor.submit(build_stage_runner, spec).result()
        self.observers = observers if observers is not None else []
        """Told of each micro-batch it forwards (see :attr:`WorkerHost.observers`)."""
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.epoch = 0
        """Counts generations: a micro-batch of an earlier one is computed, if it was started, but goes nowhere."""
        self._lock = threading.Lock()
        self.next_name = ""
        self.next_link: Link | None = None
        self.report_link: Link | None = None
        self.rejoin(rpc_timeout_s)

    def rejoin(self, rpc_timeout_s: float) -> None:
        """Forget the last generation's neighbours and micro-batches (its KV blocks are overwritten by a replay)."""
        self.rpc_timeout_s = rpc_timeout_s
        with self._lock:
            self.unlink()
            self._progress: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
            self._cancelled: set[int] = set()
            self._computing: tuple[int, float] | None = None

    def link(self, next_name: str, next_link: Link, report_link: Link) -> None:
        """This generation's links: onwards to ``next_name`` (empty: the coordinator) and to the coordinator's
        listener, for failure reports."""
        with self._lock:
            self.unlink()
            self.next_name, self.next_link, self.report_link = next_name, next_link, report_link

    def release(self) -> None:
        """The generation ends: disown its micro-batches, computing or queued, and drop its links."""
        with self._lock:
            self.unlink()
            self.epoch += 1

    def submit(self, mb_id: int, inputs: torch.Tensor, batch: tuple, sampling: list) -> None:
        """Queue micro-batch ``mb_id`` for this stage's thread, which computes it and passes it on."""
        self._mark(mb_id, "queued")
        self._executor.submit(self._work, mb_id, inputs, batch, sampling, time.perf_counter(), self.epoch)

    def computing_since(self) -> float | None:
        """Since when (monotonic) its thread has computed the micro-batch it is on; None: idle."""
        computing = self._computing
        return None if computing is None else computing[1]

    def unlink(self) -> None:
        """Drop the links to the next stage and to the coordinator (a send on them fails, and is not reported once
        the generation ended)."""
        links = (self.next_link, self.report_link)
        self.next_link, self.next_name, self.report_link = None, "", None
        for link in links:
            if link is not None:
                link.close()

    def _mark(self, mb_id: int, state: str) -> None:
        with self._lock:
            self._mark_locked(mb_id, state)

    def _mark_locked(self, mb_id: int, state: str) -> None:
        self._progress[mb_id] = (state, time.monotonic())
        self._progress.move_to_end(mb_id)
        while len(self._progress) > MAX_TRACKED:
            self._progress.popitem(last=False)

    def progress(self, mb_id: int) -> tuple[str, float]:
        """Where micro-batch ``mb_id`` is here, and for how many seconds: ('unseen', 0.0) if it never arrived."""
        with self._lock:
            state, since = self._progress.get(mb_id, ("unseen", time.monotonic()))
        return state, time.monotonic() - since

    def cancel(self, mb_ids: list[int]) -> None:
        """The coordinator gave these micro-batches up: do not compute or forward them."""
        with self._lock:
            self._cancelled.update(mb_ids)
            if len(self._cancelled) > MAX_TRACKED:
                self._cancelled = set(sorted(self._cancelled)[-MAX_TRACKED:])

    def describe(self) -> StageReport:
        """What status, health and the coordinator's start-up report show."""
        with self._lock:
            computing = self._computing
            queued = sum(1 for state, _ in self._progress.values() if state == "queued")
        return replace(
            self.runner.describe(), queued=queued,
            computing_s=None if computing is None else time.monotonic() - computing[1],
            consecutive_failures=self.consecutive_failures, last_error=self.last_error,
            error=self.runner.health_error,
        )

    def take_timings(self) -> list[StageTiming]:
        """The micro-batches computed since the last call (wall-clock seconds), then forgotten."""
        return self.runner.take_timings()

    def fail_next(self, message: str, stall_s: float = 0.0) -> None:
        """Test hook: the next micro-batch raises inside this stage (or, with ``stall_s``, computes that late)."""
        fault_injection.fail_next(self.runner, message, stall_s)

    def _work(
        self, mb_id: int, inputs: torch.Tensor, batch: tuple, sampling: list, arrived: float = 0.0, epoch: int = 0,
    ) -> None:
        started = time.perf_counter()
        with self._lock:
            cancelled = mb_id in self._cancelled or epoch != self.epoch
            if not cancelled:
                self._computing = (mb_id, time.monotonic())
        if cancelled:  # the coordinator gave it up already: nobody waits for it
            self._mark(mb_id, "cancelled")
            return
        self._mark(mb_id, "computing")
        try:
            out = self.runner.run(inputs, StepBatch.from_payload(batch), sampling, mb_id)
        except Exception as e:
            self._failed(mb_id, e)
            self._report(mb_id, epoch, e if isinstance(e, StageError) else StageError(
                f"{self.name}: {e}", stage=self.spec.index, cause=str(e)))
            return
        finally:
            with self._lock:
                self._computing = None
        self.consecutive_failures = 0
        computed = time.perf_counter()
        with self._lock:  # the message goes out in this generation, or not at all
            if mb_id in self._cancelled or epoch != self.epoch:  # given up while it computed: it goes no further
                self._mark_locked(mb_id, "cancelled")
                return
            self._mark_locked(mb_id, "forwarded" if self.next_name else "done")
            link, next_name = self.next_link, self.next_name
        try:
            if link is None:
                raise ConnectionError("not linked to it (the coordinator has not connected this stage)")
            if next_name:
                link.send("forward", (mb_id, out, batch, sampling))
            else:
                link.send("deliver", (mb_id, out))
        except Exception as e:
            self._report(mb_id, epoch, self._unreachable(next_name, str(e)))
            return
        if self.observers:
            nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 8 * len(out)
            self._observe({"queue_s": started - arrived, "compute_s": computed - started, "downstream_s":
                      time.perf_counter() - computed, "bytes_in": inputs.numel() * inputs.element_size(),
                      "bytes_out": nbytes})

    def _observe(self, record: dict) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # metrics never break a micro-batch
                pass

    def _report(self, mb_id: int, epoch: int, error: StageError) -> None:
        """Tell the coordinator micro-batch ``mb_id`` failed here (unless its generation ended)."""
        if epoch != self.epoch:
            return
        try:
            if self.report_link is None:
                raise ConnectionError("not linked to it")
            self.report_link.send("failed", (mb_id, error))
        except Exception as e:  # the coordinator is unreachable: its own deadline fails the step
            log.warning("%s: could not report micro-batch %d's failure to the coordinator: %s", self.name, mb_id, e)

    def _link_lost(self, epoch: int, reason: str) -> None:
        """The next stage's connection closed: whatever it held is lost; the coordinator finds out where."""
        if epoch == self.epoch:
            self._report(-1, epoch, self._unreachable(self.next_name, reason))

    def _unreachable(self, next_name: str, why: str) -> StageLostError:
        """The link onwards broke: the step is lost somewhere after this stage (the coordinator locates it)."""
        return StageLostError(f"{next_name or COORDINATOR} is unreachable from {self.name}: {why}", cause=why)

    def _failed(self, mb_id: int, error: BaseException) -> None:
        self._mark(mb_id, "failed")
        self.consecutive_failures += 1
        self.last_error = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
