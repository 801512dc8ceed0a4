"""The coordinator's pipeline over one generation's workers: micro-batches in over a link, token ids back to its
results registry, and, for a step that is late or lost, where it got to.

Micro-batches travel over links (:mod:`.links`); everything else (heartbeats, progress, cancel, status, timings)
is a torch RPC call to a worker's functions in :mod:`.worker_host`, by the worker's name.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch.distributed.rpc as rpc

from ..engine import (
    FaultKind,
    MicroBatch,
    Pipeline,
    StageError,
    StageLostError,
    StageReport,
    StageTiming,
    first_line,
    stage_fault,
)
from . import worker_host
from .links import Link
from .results import Results

__all__ = ["RpcPipeline"]

log = logging.getLogger(__name__)

UNHEALTHY_AFTER_FAILURES = 3
"""A stage whose last this many micro-batches all failed in it is reported down."""
DEADLINE_CHECK_S = 0.25
"""How often the coordinator looks for steps past ``cluster.rpc_timeout_s``."""


class RpcPipeline(Pipeline):
    """Micro-batches enter worker0 through ``link``; the last worker sends their token ids back to ``results`` (on
    its link to the coordinator's listener), where the stages' failure reports land too.

    A step that times out or is lost in transport is located (each stage says how far it got)
    and cancelled on every stage; its error names the stage that did not finish it. ``describe``
    reports a stage down when it does not answer, has computed one micro-batch for longer than
    the progress deadline, or failed its last micro-batches.
    """

    def __init__(
        self, names: list[str], num_blocks: int, block_size: int, timeout: float, progress_deadline_s: float,
        link: Link, results: Results, generation: int = 0, num_window_blocks: int = 0,
    ) -> None:
        super().__init__(names, num_blocks, block_size, num_window_blocks)
        self.link = link
        self.results = results
        self.generation = generation
        self.timeout = timeout
        self.progress_deadline_s = progress_deadline_s
        self._sent: dict[int, float] = {}  # micro-batches in flight: when each was sent (monotonic)
        self._overdue: set[int] = set()  # those past the deadline, being located
        self._lock = threading.Lock()
        self.on_silent: Callable[[list[int], str, int], None] | None = None
        """Told which stages did not answer when a lost step was located, and in which generation (the watchdog
        replaces them, if that is still the current one)."""
        self._diagnose = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chatloop-diagnose")
        self._closed = threading.Event()
        threading.Thread(target=self._watch_deadlines, name="chatloop-deadlines", daemon=True).start()

    def _submit(self, mb: MicroBatch) -> concurrent.futures.Future:
        result = self.results.expect(mb.id)
        with self._lock:
            self._sent[mb.id] = time.monotonic()
        result.add_done_callback(lambda _: self._forget(mb.id))
        try:
            self.link.send("forward", (mb.id, mb.token_ids, mb.batch.to_payload(), mb.sampling))
        except Exception as e:
            self.results.fail(mb.id, StageLostError(f"{self.stage_names[0]} is unreachable: {e}", stage=0,
                                               generation=self.generation, cause=str(e)))
        return result

    def _forget(self, mb_id: int) -> None:
        with self._lock:
            self._sent.pop(mb_id, None)
            self._overdue.discard(mb_id)

    def failed(self, mb_id: int, error: BaseException) -> None:
        """A stage reported micro-batch ``mb_id`` failed (-1: a link closed, and every step in flight may be lost).

        A stage's own error fails the step; a step lost in transport, or late, is located first (off the
        caller's thread: it asks every stage), and its error names the stage that held it up.
        """
        with self._lock:
            in_flight = [mb_id] if mb_id in self._sent else list(self._sent) if mb_id < 0 else []
        for k in in_flight:
            if not isinstance(error, StageError) or error.located:
                self.results.fail(k, error)
                continue
            try:
                self._diagnose.submit(self._fail_lost, k, error)
            except RuntimeError:  # this pipeline is closed: its generation was lost already
                self.results.fail(k, StageLostError(f"{first_line(error)} (generation {self.generation})",
                                               generation=self.generation, cause=error.cause))

    def _watch_deadlines(self) -> None:
        """A step that has not come back within the timeout is lost somewhere: locate it."""
        while not self._closed.wait(DEADLINE_CHECK_S):
            now = time.monotonic()
            with self._lock:
                late = [k for k, sent in self._sent.items() if now - sent > self.timeout and k not in self._overdue]
                self._overdue.update(late)
            for k in late:
                self.failed(k, StageError(f"micro-batch {k} ran for more than {self.timeout:g} s",
                                          kind=FaultKind.TIMED_OUT, generation=self.generation))

    # ---- where a step is -----------------------------------------------------------------------
    def heartbeat(self, timeout: float) -> dict[int, str]:
        """Ask every stage's RPC threads for a sign of life: {stage: why} for those that give none, whose compute
        thread has been on one micro-batch for longer than the progress deadline, or that found themselves unhealthy
        (their outputs turned non-finite)."""
        futures = [rpc.rpc_async(name, worker_host.alive, timeout=timeout) for name in self.stage_names]
        lost = {}
        for k, f in enumerate(futures):
            try:
                _, computing_s, unhealthy = f.wait()
            except Exception as e:
                lost[k] = f"no answer to the heartbeat within {timeout:g} s ({first_line(e)})"
                continue
            if unhealthy is not None:
                lost[k] = f"unhealthy: {unhealthy}"
            elif computing_s is not None and computing_s > self.progress_deadline_s:
                lost[k] = (f"no progress: one micro-batch has been computing for {computing_s:.0f} s "
                           f"(cluster.progress_deadline_s={self.progress_deadline_s:g})")
        return lost

    def locate(self, mb_id: int, timeout: float | None = None) -> list[tuple[str, float] | str]:
        """Each stage's (state, seconds) for micro-batch ``mb_id``, or why it did not answer."""
        timeout = timeout or max(1.0, min(5.0, self.timeout / 4))
        futures = [rpc.rpc_async(name, worker_host.progress, args=(mb_id,), timeout=timeout)
                   for name in self.stage_names]
        out: list[tuple[str, float] | str] = []
        for f in futures:
            try:
                out.append(tuple(f.wait()))  # type: ignore[arg-type]
            except Exception as e:
                out.append(first_line(e))
        return out

    def blame(self, mb_id: int, where: list[tuple[str, float] | str]) -> tuple[int | None, str]:
        """Which stage holds micro-batch ``mb_id`` up (None: none does), and how, from :meth:`locate`'s answer."""
        silent = [k for k, state in enumerate(where) if isinstance(state, str)]
        if silent:
            names = ", ".join(self.stage_names[k] for k in silent)
            return silent[0], (f"{names} {'does' if len(silent) == 1 else 'do'} not answer (stopped, overloaded or "
                               f"unreachable): micro-batch {mb_id} was lost")
        last = len(self.stage_names) - 1
        for k, (state, seconds) in enumerate(where):  # type: ignore[misc]
            if state not in ("done", "forwarded") or (k == last and state != "done"):
                return k, f"{self.stage_names[k]} did not finish micro-batch {mb_id} ({state} for {seconds:.1f} s)"
        return None, f"micro-batch {mb_id} passed every stage, but its tokens never reached the coordinator"

    def _fail_lost(self, mb_id: int, error: StageError) -> None:
        where = self.locate(mb_id)
        silent = [k for k, state in enumerate(where) if isinstance(state, str)]
        timed_out = error.kind is FaultKind.TIMED_OUT
        if timed_out and not silent and self._rearm_if_moving(mb_id, where):
            return
        if silent and self.on_silent is not None:
            self.on_silent(silent, f"no answer: {where[silent[0]]}", self.generation)
        self.cancel([mb_id])
        reason = f"no answer within cluster.rpc_timeout_s={self.timeout:g} s" if timed_out else first_line(error)
        # A stage that does not answer was lost (its sequences wait for the rebuilt pipeline); a step that only
        # took too long, or whose link closed, where every stage answers fails its requests: a replay would too.
        kind = FaultKind.LOST if silent else FaultKind.TIMED_OUT if timed_out else FaultKind.FAILED
        stage, blame = self.blame(mb_id, where)
        self.results.fail(mb_id, stage_fault(kind, f"{blame} ({reason})", stage=stage, generation=self.generation,
                                        cause=reason))

    def _rearm_if_moving(self, mb_id: int, where: list[tuple[str, float]]) -> bool:
        """A late step that waits its turn behind others, or that a stage has been computing for less than the
        timeout, is not lost (a busy pipeline of long prefills): it gets another ``timeout`` instead of failing."""
        moving = [(name, state, seconds) for name, (state, seconds) in zip(self.stage_names, where)
                  if state == "queued" or (state == "computing" and seconds < self.timeout)]
        if not moving:
            return False
        with self._lock:
            if mb_id not in self._sent:  # delivered meanwhile
                return True
            self._sent[mb_id] = time.monotonic()
            self._overdue.discard(mb_id)
        name, state, seconds = moving[0]
        log.info("generation %d: micro-batch %d is past cluster.rpc_timeout_s=%g s but %s at %s (for %.1f s): waiting "
                 "for it", self.generation, mb_id, self.timeout, state, name, seconds)
        return True

    def cancel(self, mb_ids: list[int]) -> None:
        """Tell every stage to skip these micro-batches (best effort: a stage that does not answer is skipped)."""
        for name in self.stage_names:
            try:
                rpc.rpc_async(name, worker_host.cancel, args=(mb_ids,), timeout=2.0)
            except Exception:  # an unreachable stage computes nothing anyway
                pass

    # ---- the Pipeline interface -----------------------------------------------------------------
    def describe(self, timeout: float = 5.0) -> list[StageReport]:
        futures = [rpc.rpc_async(name, worker_host.describe, timeout=timeout) for name in self.stage_names]
        reports = []
        for k, (name, f) in enumerate(zip(self.stage_names, futures)):
            try:
                reports.append(self._judge(f.wait()))
            except Exception as e:
                reports.append(StageReport.down(name, k, f"no answer within {timeout:g} s: {first_line(e)}"))
        return reports

    def _judge(self, report: StageReport) -> StageReport:
        """A stage that answers but does not get on with its work is down too."""
        if report.computing_s is not None and report.computing_s > self.progress_deadline_s:
            return _down(report, f"no progress: one micro-batch has been computing for {report.computing_s:.0f} s "
                                 f"(cluster.progress_deadline_s={self.progress_deadline_s:g})")
        if (report.consecutive_failures or 0) >= UNHEALTHY_AFTER_FAILURES:
            return _down(report, f"its last {report.consecutive_failures} micro-batches failed: {report.last_error}")
        return report

    def take_timings(self) -> dict[str, list[StageTiming]]:
        futures = [rpc.rpc_async(name, worker_host.take_timings, timeout=self.timeout) for name in self.stage_names]
        return {name: [StageTiming(*t) for t in f.wait()] for name, f in zip(self.stage_names, futures)}

    def inject_failure(self, stage: int, message: str = "injected", stall_s: float = 0.0) -> None:
        """Test hook: make ``stage`` fail its next micro-batch (:func:`~chatloop.stage.fault_injection.fail_next`)."""
        rpc.rpc_sync(self.stage_names[stage], worker_host.fail_next, args=(message, stall_s))

    def close(self) -> None:
        self._closed.set()
        self._diagnose.shutdown(wait=False, cancel_futures=True)
        self.link.close()


def _down(report: StageReport, error: str) -> StageReport:
    return replace(report, error=error)
