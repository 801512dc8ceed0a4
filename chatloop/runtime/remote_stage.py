"""A worker's stage: it computes and forwards to the next stage; the last one answers the coordinator.

A worker holds one stage (:data:`CURRENT`); the module's functions are what the coordinator calls
on it over RPC, by the worker's name (``rpc.rpc_async("worker2", remote_stage.describe)``). No
RRef is used: torch binds its RRef machinery to a process's first RPC agent for good, and a
worker lives through several generations, each with an agent of its own.

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
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from ..engine import StageError, StageLostError, StageReport, StageTiming
from ..engine.pipeline import compute_thread
from ..models import LayerRange, StepBatch
from ..network import local_addresses, rank_address, runs_here
from ..partition import Manifest
from ..stage import StageRunner, StageSpec, build_stage_runner, fault_injection
from .links import Link, LinkListener
from .results import COORDINATOR

__all__ = [
    "METRICS_PORT", "RemoteStage", "alive", "cancel", "connect", "create_stage", "describe", "fail_next", "forward",
    "listen", "progress", "release", "take_timings",
]

log = logging.getLogger(__name__)

CURRENT: RemoteStage | None = None
"""The stage this worker process hosts, once created (``worker_metrics`` reads it at scrape time)."""
METRICS_PORT: int | None = None
"""This worker's Prometheus port, once it serves one (reported by ``describe``)."""
HEALTH_PORT: int | None = None
"""This worker's health endpoint, if it has one (``chatloop-worker``)."""
LISTENER: LinkListener | None = None
"""Where the previous stage (or the coordinator) sends this worker its micro-batches (see :func:`listen`)."""
OWN = None
"""This worker's own config file (a ``WorkerFile``), when it was started from one: the coordinator's requests are
checked against it, and its partitions folder and KV budget are this host's."""
MAX_TRACKED = 4096
"""Micro-batches whose progress a stage remembers (the coordinator asks about recent ones only)."""
OBSERVERS: list[Callable[[dict], None]] = []
"""Called with {"queue_s", "compute_s", "bytes_in", "bytes_out"} after each micro-batch (stage thread), and with
{"downstream_s"} when the next stage answers (RPC thread); ``worker_metrics`` registers one."""


def _observe(record: dict) -> None:
    for observer in OBSERVERS:
        try:
            observer(record)
        except Exception:  # metrics never break a micro-batch
            pass


def listen() -> str:
    """Accept micro-batches on this rank's interface (once per process); the address they are sent to."""
    global LISTENER
    if LISTENER is None:
        LISTENER = LinkListener(rank_address(dict(os.environ)), _serve_call, name="stage")
    return LISTENER.address


def _serve_call(method: str, args: tuple) -> None:
    if method != "forward":
        raise ValueError(f"a stage serves 'forward' on its link, not {method!r}")
    forward(*args)


def release() -> None:
    """A generation ends on this worker: disown its micro-batches, computing or queued (their answers and their
    calls onwards belong to the generation that ended), and drop its links."""
    if CURRENT is not None:
        with CURRENT._lock:
            CURRENT.unlink()
            CURRENT.epoch += 1


# ---- what other ranks call on this worker ----------------------------------------------------------
def create_stage(spec: StageSpec, rpc_timeout_s: float) -> StageReport:
    """This worker's stage for the new generation (the loaded one again, if it is the same and healthy: an
    unhealthy one is loaded again, its partition verified); its report."""
    global CURRENT
    if OWN is not None:
        spec = _as_configured(spec, OWN)
    if CURRENT is not None and CURRENT.spec == spec and CURRENT.runner.unhealthy is None:
        CURRENT.rejoin(rpc_timeout_s)
        return CURRENT.describe()
    if CURRENT is not None and CURRENT.runner.unhealthy is not None:
        log.warning("%s: loading its stage again (it was unhealthy: %s)", CURRENT.name, CURRENT.runner.unhealthy)
        CURRENT = None  # its weights go before the new ones load
    return RemoteStage(spec, rpc_timeout_s, metrics_port=METRICS_PORT).describe()


def _as_configured(spec: StageSpec, own) -> StageSpec:
    """The coordinator's spec, checked against this worker's file, with this host's folder and KV budget."""
    asked = (spec.index, spec.expected_layers)
    if spec.index != own.worker:
        raise ValueError(f"{own.source} is worker {own.worker}, the coordinator took it for worker {spec.index}: "
                         f"start each worker with its own file")
    if spec.expected_layers is not None and (spec.expected_layers.start, spec.expected_layers.end) != (
            own.start_layer, own.end_layer):
        raise ValueError(f"{own.source} gives {own.name} layers {own.start_layer}-{own.end_layer}, the coordinator "
                         f"asks for {spec.expected_layers} ({asked}): make the coordinator's cluster.workers match")
    if spec.expected_file is not None and spec.expected_file != own.partition:
        raise ValueError(f"{own.source} names partition {own.partition}, the coordinator {spec.expected_file}")
    why = Manifest.load(own.partitions_dir).mismatch(own.worker, own.source, own.partitions_dir, file=own.partition,
                                                     layers=LayerRange(own.start_layer, own.end_layer))
    if why is not None:
        raise ValueError(f"{why}: use the file chatloop-split wrote with these partitions")
    return replace(spec, directory=own.partitions_dir, kv_cache_mb=own.kv_cache_mb, expected_file=own.partition,
                   expected_layers=LayerRange(own.start_layer, own.end_layer))


def _stage() -> RemoteStage:
    if CURRENT is None:
        raise StageError("this worker holds no stage yet")
    return CURRENT


def connect(next_name: str, next_address: str, secret: str, report_address: str) -> None:
    """Serve links that show this generation's ``secret``, and link this stage to the next one (``next_name``, at
    ``next_address``; for the last stage, an empty name and the coordinator's address) and to the coordinator's
    listener at ``report_address`` (where its failure reports go)."""
    stage = _stage()
    if OWN is not None and bool(next_name) != (OWN.next_worker is not None):
        raise ValueError(f"{OWN.source} says {OWN.name}'s next worker is {OWN.next_worker}, the coordinator's chain "
                         f"{'continues to ' + next_name if next_name else 'ends here'}: split and configure again")
    listen()
    LISTENER.admit(secret)
    epoch = stage.epoch
    link = Link(next_name or COORDINATOR, next_address, secret,
                on_closed=lambda reason: stage._link_lost(epoch, reason))
    reports = Link(COORDINATOR, report_address, secret)
    with stage._lock:
        stage.unlink()
        stage.next_name, stage.next_link, stage.report_link = next_name, link, reports


def describe() -> StageReport:
    return _stage().describe()


def alive() -> tuple[int, float | None, str | None]:
    """The coordinator's heartbeat, answered by an RPC thread whatever the compute thread does: the pid, for
    how long the micro-batch being computed has been computing (None: idle), and why the stage is unhealthy (its
    outputs turned non-finite; None: it is not)."""
    computing = CURRENT._computing if CURRENT is not None else None
    unhealthy = CURRENT.runner.unhealthy if CURRENT is not None else None
    return os.getpid(), None if computing is None else time.monotonic() - computing[1], unhealthy


def progress(mb_id: int) -> tuple[str, float]:
    return _stage().progress(mb_id)


def cancel(mb_ids: list[int]) -> None:
    _stage().cancel(mb_ids)


def take_timings() -> list[StageTiming]:
    return _stage().take_timings()


def fail_next(message: str, stall_s: float = 0.0) -> None:
    _stage().fail_next(message, stall_s)


def forward(mb_id: int, inputs: torch.Tensor, batch: tuple, sampling: list) -> None:
    """Queue micro-batch ``mb_id`` for this stage's thread, which computes it and passes it on (its link's
    listener calls this for every ``forward`` message)."""
    host = _stage()
    host._mark(mb_id, "queued")
    host._executor.submit(host._work, mb_id, inputs, batch, sampling, time.perf_counter(), host.epoch)


class RemoteStage:
    """Lives on a worker (made by :func:`create_stage`); holds the stage runner and its thread.

    It remembers where each recent micro-batch is (queued, computing, forwarded, done, failed,
    cancelled), so that the coordinator can tell which stage a late step is stuck at, and it
    skips the micro-batches the coordinator cancelled.
    """

    def __init__(self, spec: StageSpec, rpc_timeout_s: float, metrics_port: int | None = None) -> None:
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
        self.metrics_port = metrics_port
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.epoch = 0
        """Counts generations: a micro-batch of an earlier one is computed, if it was started, but goes nowhere."""
        self._lock = threading.Lock()
        self.next_name = ""
        self.next_link: Link | None = None
        self.report_link: Link | None = None
        self.rejoin(rpc_timeout_s)
        global CURRENT
        CURRENT = self

    def rejoin(self, rpc_timeout_s: float) -> None:
        """Forget the last generation's neighbours and micro-batches (its KV blocks are overwritten by a replay)."""
        self.rpc_timeout_s = rpc_timeout_s
        with self._lock:
            self.unlink()
            self._progress: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
            self._cancelled: set[int] = set()
            self._computing: tuple[int, float] | None = None

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
            self.runner.describe(), metrics_port=self.metrics_port, health_port=HEALTH_PORT, link_address=listen(),
            queued=queued,
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
        if OBSERVERS:
            nbytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 8 * len(out)
            _observe({"queue_s": started - arrived, "compute_s": computed - started, "downstream_s":
                      time.perf_counter() - computed, "bytes_in": inputs.numel() * inputs.element_size(),
                      "bytes_out": nbytes})

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
