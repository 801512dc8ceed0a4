"""What a worker process holds for the coordinator across generations, and the functions the coordinator calls on it.

A :class:`WorkerHost` owns everything of one worker that outlives a generation: its stage (a
:class:`~chatloop.runtime.remote_stage.RemoteStage`, once created, kept while it is the same and healthy), the link
listener its micro-batches arrive on, its own config file, its metrics and health ports, the observers of its
micro-batches (its Prometheus endpoint) and what it is doing (its health endpoint). Tests make as many as they like.

The coordinator reaches it through the module functions below, over torch RPC, by the worker's name
(``rpc.rpc_async("worker2", worker_host.describe)``): torch runs a function by its qualified name in the callee, so
a call finds this process's worker through one process-wide slot, :data:`PROCESS_WORKER`, set once by
:func:`~chatloop.runtime.worker.serve_worker`. It is the only module state of the worker's side. torch's own way to
reach an object on another rank, an RRef (``rpc.remote(worker, cls)``, then ``rref.rpc_async().method()``), does
not live through generations: torch binds its RRef machinery to a process's first RPC agent for good, and after that
agent's shutdown an RRef made in a later generation fails ("RPC is no longer running on this node"; seen on torch
2.13), while a worker keeps its process, and its loaded stage, from one generation to the next.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed.rpc as rpc

from ..engine import StageError, StageReport, StageTiming
from ..models import LayerRange
from ..network import rank_address
from ..partition import Manifest
from ..partition.placement import HostFigures
from ..partition.ranges import missing_files
from ..stage import StageSpec
from ..stage.probe import probe_spec, round_trip_s
from .links import Link, LinkListener
from .remote_stage import RemoteStage
from .results import COORDINATOR

__all__ = [
    "PROCESS_WORKER", "WorkerHost", "alive", "cancel", "connect", "create_stage", "describe", "fail_next",
    "probe", "progress", "round_trip_to", "serve", "take_timings",
]

log = logging.getLogger(__name__)


class WorkerHost:
    """One worker's side across generations (see the module's docstring).

    ``own``: its config file (a ``WorkerFile``, ``chatloop-worker``), which the coordinator's requests are checked
    against and whose partitions folder and KV budget are this host's; ``metrics_port`` and ``health_port``: where
    it serves them, if it does (reported by :meth:`describe`).
    """

    def __init__(self, own: Any = None, metrics_port: int | None = None, health_port: int | None = None) -> None:
        self.own = own
        self.metrics_port = metrics_port
        self.health_port = health_port
        self.stage: RemoteStage | None = None
        """The stage it holds, once created."""
        self.listener: LinkListener | None = None
        """Where the previous stage (or the coordinator) sends its micro-batches (see :meth:`listen`)."""
        self.observers: list[Callable[[dict], None]] = []
        """Called with {"queue_s", "compute_s", "downstream_s", "bytes_in", "bytes_out"} after each micro-batch it
        forwards (the stage's thread); ``worker_metrics`` registers one."""
        self.activity: dict[str, Any] = {"state": "starting", "generation": None}
        """What it is doing (starting, joining, serving, leaving) and in which generation: its health endpoint."""

    # ---- what the coordinator's calls do --------------------------------------------------------------
    def create_stage(self, spec: StageSpec, rpc_timeout_s: float) -> StageReport:
        """Its stage for the new generation (the loaded one again, if it is the same and healthy: an unhealthy one
        is loaded again, its partition verified); its report."""
        if self.own is not None:
            spec = _as_configured(spec, self.own)
        stage = self.stage
        if stage is not None and stage.spec == spec and stage.runner.unhealthy is None:
            stage.rejoin(rpc_timeout_s)
            return self.describe()
        if stage is not None and stage.runner.unhealthy is not None:
            log.warning("%s: loading its stage again (it was unhealthy: %s)", stage.name, stage.runner.unhealthy)
            self.stage = None  # its weights go before the new ones load
        self.stage = RemoteStage(spec, rpc_timeout_s, observers=self.observers)
        return self.describe()

    def probe(self, spec: StageSpec) -> tuple[HostFigures, LayerRange | None]:
        """This host's figures for ``cluster.plan=auto`` (:mod:`chatloop.stage.probe`), on its own files, and the
        range of the healthy stage it holds (None: none), which the plan keeps unless a new one is clearly faster."""
        if self.own is not None:
            spec = replace(spec, directory=self.own.partitions_dir, held_files=tuple(self.own.held_files))
        stage = self.stage
        held = stage.runner.stage.layers_range if stage is not None and stage.runner.unhealthy is None else None
        return probe_spec(spec), held

    def connect(self, next_name: str, next_address: str, secret: str, report_address: str) -> None:
        """Serve links that show this generation's ``secret``, and link its stage to the next one (``next_name``, at
        ``next_address``; for the last stage, an empty name and the coordinator's address) and to the coordinator's
        listener at ``report_address`` (where its failure reports go)."""
        stage = self.held()
        own = self.own
        if own is not None and bool(next_name) != (own.next_worker is not None):
            raise ValueError(f"{own.source} says {own.name}'s next worker is {own.next_worker}, the coordinator's "
                             f"chain {'continues to ' + next_name if next_name else 'ends here'}: split and configure "
                             "again")
        self.listen()
        self.listener.admit(secret)  # type: ignore[union-attr]
        epoch = stage.epoch
        link = Link(next_name or COORDINATOR, next_address, secret,
                    on_closed=lambda reason: stage._link_lost(epoch, reason))
        reports = Link(COORDINATOR, report_address, secret)
        stage.link(next_name, link, reports)

    def release(self) -> None:
        """A generation ends here: its stage disowns its micro-batches, computing or queued (their answers and their
        calls onwards belong to the generation that ended), and drops its links."""
        if self.stage is not None:
            self.stage.release()

    def listen(self) -> str:
        """Accept micro-batches on this rank's interface (one listener for every generation); its address."""
        if self.listener is None:
            self.listener = LinkListener(rank_address(dict(os.environ)), self._serve_call, name="stage")
        return self.listener.address

    def _serve_call(self, method: str, args: tuple) -> None:
        if method != "forward":
            raise ValueError(f"a stage serves 'forward' on its link, not {method!r}")
        self.forward(*args)

    def forward(self, mb_id: int, inputs: torch.Tensor, batch: tuple, sampling: list) -> None:
        """Queue micro-batch ``mb_id`` for its stage's thread, which computes it and passes it on (its link
        listener calls this for every ``forward`` message)."""
        self.held().submit(mb_id, inputs, batch, sampling)

    def held(self) -> RemoteStage:
        """Its stage; StageError if it holds none yet."""
        if self.stage is None:
            raise StageError("this worker holds no stage yet")
        return self.stage

    def describe(self) -> StageReport:
        """What status, health and the coordinator's start-up report show."""
        return replace(self.held().describe(), metrics_port=self.metrics_port, health_port=self.health_port,
                       link_address=self.listen())

    def alive(self) -> tuple[int, float | None, str | None]:
        """The coordinator's heartbeat, answered by an RPC thread whatever the compute thread does: the pid, for
        how long the micro-batch being computed has been computing (None: idle), and why the stage is unhealthy
        (its outputs turned non-finite; None: it is not)."""
        stage = self.stage
        computing = stage.computing_since() if stage is not None else None
        unhealthy = stage.runner.unhealthy if stage is not None else None
        return os.getpid(), None if computing is None else time.monotonic() - computing, unhealthy


def _as_configured(spec: StageSpec, own) -> StageSpec:
    """The coordinator's spec, checked against this worker's file, with this host's folder and KV budget."""
    asked = (spec.index, spec.expected_layers)
    if spec.index != own.worker:
        raise ValueError(f"{own.source} is worker {own.worker}, the coordinator took it for worker {spec.index}: "
                         f"start each worker with its own file")
    if spec.planned and spec.expected_layers is not None and (
            spec.expected_layers.start, spec.expected_layers.end) != (own.start_layer, own.end_layer):
        # A planned range (cluster.plan=auto): any range the files this host holds cover, its KV pool in proportion.
        missing = missing_files(Manifest.load(own.partitions_dir), spec.expected_layers, own.held_files)
        if missing:
            raise ValueError(f"the coordinator's plan gives {own.name} layers {spec.expected_layers}, which need "
                             f"{', '.join(missing)}: copy them to {own.partitions_dir} and list them in "
                             f"{own.source}'s holds")
        share = len(spec.expected_layers) / (own.end_layer - own.start_layer + 1)
        return replace(spec, directory=own.partitions_dir, kv_cache_mb=own.kv_cache_mb * share,
                       held_files=tuple(own.held_files))
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


# ---- the process-wide slot, and what other ranks call through it ----------------------------------------------
PROCESS_WORKER: WorkerHost | None = None
"""The worker this process serves (see the module's docstring for why it is process-wide): set by :func:`serve`."""


def serve(host: WorkerHost) -> None:
    """Make ``host`` the worker this process's RPC calls reach (once per process; a later one replaces it)."""
    global PROCESS_WORKER
    PROCESS_WORKER = host


def _served() -> WorkerHost:
    if PROCESS_WORKER is None:
        raise StageError("this process serves no worker")
    return PROCESS_WORKER


def create_stage(spec: StageSpec, rpc_timeout_s: float) -> StageReport:
    return _served().create_stage(spec, rpc_timeout_s)


def connect(next_name: str, next_address: str, secret: str, report_address: str) -> None:
    _served().connect(next_name, next_address, secret, report_address)


def describe() -> StageReport:
    return _served().describe()


def probe(spec: StageSpec) -> tuple[HostFigures, LayerRange | None]:
    return _served().probe(spec)


def alive() -> tuple[int, float | None, str | None]:
    return _served().alive()


def round_trip_to(name: str, timeout: float) -> float:
    """The median round trip of a call from this worker to worker ``name`` (the next stage's, for its hop in the
    plan: stages hand each other their micro-batches directly, not through the coordinator)."""
    return round_trip_s(lambda: rpc.rpc_sync(name, alive, timeout=timeout))


def progress(mb_id: int) -> tuple[str, float]:
    return _served().held().progress(mb_id)


def cancel(mb_ids: list[int]) -> None:
    _served().held().cancel(mb_ids)


def take_timings() -> list[StageTiming]:
    return _served().held().take_timings()


def fail_next(message: str, stall_s: float = 0.0) -> None:
    _served().held().fail_next(message, stall_s)
