"""The coordinator's side of the cluster: worker processes, the store, and one generation (RPC world) at a time.

Rank 0 is the coordinator (RPC name ``coordinator``), rank k is ``worker{k-1}``. On one host
the coordinator starts the worker processes itself and hosts the store on
``cluster.master_addr:cluster.master_port`` (loopback by default); under torchrun every rank
meets in torchrun's store. Each rank talks to the others through the interface that routes to
the coordinator (:func:`~chatloop.network.rank_interfaces`), so several hosts work without
GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME. A worker that exits while the cluster starts fails the
start at once, with its exit status and the last lines it wrote.

:class:`RpcCluster` keeps what outlives a generation (the settings, the store, the workers it started, what each
worker ever said, the link listener, the watchdog); each RPC world is a
:class:`~chatloop.runtime.generation.Generation`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from ..config import ChatLoopConfig
from ..engine import StageReport, first_line
from ..engine.pipeline import StepObserver, stage_name
from ..network import rank_address, rank_interfaces, under_torchrun
from ..partition.placement import HostFigures, Placement
from .faults import GenerationError, Loss
from .generation import Generation
from .healing import State, Watchdog
from .links import LinkListener
from .processes import WorkerProcess, write_config
from .rendezvous import Rendezvous, RendezvousError
from .rpc_pipeline import RpcPipeline
from .supervisor import WorkerSupervisor

__all__ = ["ClusterListener", "GenerationError", "RpcCluster", "RpcPipeline", "StartupError"]

log = logging.getLogger(__name__)
# torch's RPC builds its barrier on a Gloo group through an API torch itself deprecates; the
# warning is about torch's code, not ours, and each rank printed it on every start.
warnings.filterwarnings("ignore", message="You are using a Backend .*ProcessGroupGloo", category=UserWarning)

STOP_WAIT_S = 1.5
"""At shutdown, how long the workers this process started get to leave by themselves before they are killed."""


class StartupError(RuntimeError):
    """The cluster could not start: the message names the rank and what to change."""


class ClusterListener(Protocol):
    """What the cluster tells its user (``ChatLoop``: the scheduler) while it heals itself."""

    def pipeline_lost(self, reason: str) -> int:
        """Stop launching steps; requeue the running sequences for a replay. Returns how many."""

    def pipeline_restored(self, pipeline: RpcPipeline) -> None:
        """Carry on with the rebuilt pipeline."""

    def pipeline_unavailable(self, error: BaseException) -> None:
        """The lost stages did not come back in time: end the waiting and running requests with ``error``."""


class RpcCluster:
    """The coordinator's view of the ranks; ``start`` returns once every stage has loaded.

    After that a watchdog (:mod:`~chatloop.runtime.healing`) notices lost workers and replaces the current
    generation by the next: the workers it started are started again, the others (torchrun, other hosts) are
    waited for.
    """

    def __init__(self, cfg: ChatLoopConfig, rendezvous: Rendezvous, partitions_dir: str) -> None:
        self.cfg = cfg
        self.rendezvous = rendezvous
        self.partitions_dir = partitions_dir
        self.supervisors: list[WorkerSupervisor] = []
        """The workers this process started (on one host); empty under torchrun."""
        self.current: Generation | None = None
        """The generation being formed, serving, or last left (None before the first)."""
        self.known: dict[int, dict] = {}
        """What each worker said when it last announced itself, in any generation: a lost worker's messages name
        it (its container) and say how to bring it back."""
        self.closing = threading.Event()
        """Set when :meth:`shutdown` begins: a generation being formed stops waiting, nothing is restarted."""
        self.listener: ClusterListener | None = None
        self.link_listener: LinkListener | None = None
        """Where the last stage delivers token ids and the stages report failures (this rank's interface, an
        ephemeral port), for every generation: each admits its own secret, and its messages go to its results."""
        self.step_observers: list[StepObserver] = []
        """Every generation's pipeline calls these after each step (benchmarks add them)."""
        self.watchdog: Watchdog | None = None
        self._config_file: str | None = None
        self._shut = False

    # ---- the current generation, as the engine and serving see it -------------------------------------
    @property
    def generation(self) -> int:
        """The current generation's number."""
        return self.current.number if self.current is not None else 0

    @property
    def pipeline(self) -> RpcPipeline | None:
        """The current generation's pipeline (None between generations)."""
        return self.current.pipeline if self.current is not None else None

    @property
    def members(self) -> dict[int, dict]:
        """What each worker said when it joined the current generation (see :mod:`~chatloop.runtime.members`)."""
        return self.current.members if self.current is not None else {}

    @property
    def stage_reports(self) -> list[StageReport]:
        """What each stage said when the current generation loaded it."""
        return self.current.stage_reports if self.current is not None else []

    @property
    def placement(self) -> tuple[Placement | None, list[HostFigures]]:
        """The current generation's plan under cluster.plan=auto and the figures it came from ((None, []) else)."""
        current = self.current
        return (current.placement, current.plan_figures) if current is not None else (None, [])

    @property
    def workers(self) -> list[WorkerProcess]:
        return [s.process for s in self.supervisors if s.process is not None]

    @property
    def stage_names(self) -> list[str]:
        return [stage_name(k) for k in range(self.cfg.cluster.num_workers)]

    @classmethod
    def start(cls, cfg: ChatLoopConfig, partitions_dir: str, prepare: Callable[[], object] | None = None) -> RpcCluster:
        """Check and split (``prepare``), start or meet the workers, form generation 0 and load its stages."""
        num_workers = cfg.cluster.num_workers
        timeout = cfg.cluster.startup_timeout_s
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) != num_workers + 1:
            raise StartupError(
                f"torchrun started {os.environ['WORLD_SIZE']} ranks, cluster.num_workers={num_workers} needs "
                f"{num_workers + 1} (1 coordinator + {num_workers} workers): use --nproc-per-node {num_workers + 1} "
                "or change num_workers"
            )
        if prepare:  # workers wait in the store meanwhile: a slow first split times nothing out
            prepare()
        try:
            if under_torchrun():
                master = os.environ["MASTER_ADDR"]
                rendezvous = Rendezvous.torchrun(timeout)
            else:
                master = cfg.cluster.master_addr
                rendezvous = Rendezvous.host(master, cfg.cluster.master_port, timeout)
            os.environ.update(rank_interfaces(master, dict(os.environ)))
        except (RendezvousError, OSError) as e:
            raise StartupError(str(e)) from None
        cluster = cls(cfg, rendezvous, partitions_dir)
        try:
            if not under_torchrun() and cfg.cluster.launch == "spawn":
                cluster._config_file = str(write_config(cfg))
                cluster.supervisors = _start_workers(cfg, cluster._config_file, rendezvous.where)
            elif not under_torchrun():
                log.info("waiting for %d workers at %s (chatloop-worker --config configs/worker-config-N.yaml "
                         "--coordinator %s)", num_workers, rendezvous.where, rendezvous.where)
            deadline = time.monotonic() + timeout
            generation = cluster.begin()
            generation.form(deadline, on_exit=_refuse_exit, waited=f"cluster.startup_timeout_s={timeout:g} s")
            generation.load(deadline)
        except GenerationError as e:
            cluster.shutdown()
            raise StartupError(str(e)) from None
        except BaseException:
            cluster.shutdown()
            raise
        if cfg.cluster.self_healing:
            cluster.watchdog = Watchdog(cluster, cfg.cluster)
        return cluster

    # ---- generations -----------------------------------------------------------------------------
    def begin(self) -> Generation:
        """The next generation (0, then one past the current), not yet formed; from now on the current one."""
        if self.link_listener is None:
            self.link_listener = LinkListener(rank_address(dict(os.environ)), self._serve_link, name="results")
        self.current = Generation(
            0 if self.current is None else self.current.number + 1, self.cfg, self.rendezvous,
            partitions_dir=self.partitions_dir, supervisors=self.supervisors, known=self.known, closing=self.closing,
            listener=self.link_listener, observers=self.step_observers, on_silent=self._stages_silent,
        )
        return self.current

    def _serve_link(self, method: str, args: tuple) -> None:
        """A message on the coordinator's listener: for the current generation's results (the listener admits only
        its secret, so a generation's messages never reach the next one's)."""
        current = self.current
        if current is None:
            raise ValueError("no generation to deliver to")
        current.results.serve_call(method, args)

    def _stages_silent(self, indices: list[int], reason: str, generation: int) -> None:
        if self.watchdog is not None:
            self.watchdog.report({k: reason for k in indices}, generation)

    def announced(self, index: int) -> dict | None:
        """What worker ``index`` said when it last joined (pid, host, container, command), if it ever did."""
        return self.known.get(index) or self.members.get(index)

    def evict(self, index: int) -> None:
        """Tell worker ``index``'s supervisor elsewhere (a torchrun rank) to kill and replace it."""
        pid = (self.announced(index) or {}).get("pid")
        if pid is not None:
            self.rendezvous.evict(index, int(pid))

    def describe(self, timeout: float) -> list[StageReport]:
        """Every stage's report, with the container its worker runs in; while the cluster heals, the lost stages
        say so (and why, and how to bring them back)."""
        pipeline = self.pipeline
        if self.watchdog is not None and self.watchdog.lost:
            lost = dict(self.watchdog.lost)
            state = self.watchdog.state
            reports = [replace(StageReport.down(name, k, f"{state.value}: {lost[k]}"),
                               recovering=state is State.RECOVERING)
                       if k in lost else StageReport(name=name, index=k, host=(self.members.get(k) or {}).get("host"))
                       for k, name in enumerate(self.stage_names)]
        elif pipeline is None:
            reports = [StageReport.down(name, k, "the cluster is stopped") for k, name in enumerate(self.stage_names)]
        else:
            reports = pipeline.describe(timeout)
        return [replace(r, container=(self.known.get(r.index) or {}).get("container")) for r in reports]

    # ---- stopping ------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every rank, in well under a second: the workers leave (and exit) when the store says the service
        closed; the ones this process started that are still there after ``STOP_WAIT_S`` are killed.

        RPC goes down with every rank at once while every worker is there (no errors logged), else at once: a
        graceful shutdown waits for every rank, and with one gone (the case a SIGTERM often follows) it took
        ``timeout`` (10 s) before this process even looked at its workers again.
        """
        if self._shut:
            return
        self._shut = True
        self.closing.set()
        for supervisor in self.supervisors:
            supervisor.closed = True  # nothing is started again from now on
        if self.watchdog is not None:
            self.watchdog.stop()
        whole = (self.watchdog is None or self.watchdog.state is State.SERVING) and all(
            s.process is None or s.process.poll() is None for s in self.supervisors)
        try:
            self.rendezvous.close_service(graceful=whole)  # before the generation ends: the workers leave for good
        except Exception as e:  # the store is ours on one host; under torchrun it may be gone already
            log.debug("could not tell the workers to leave: %s", first_line(e))
        if self.current is not None:
            self.current.leave(graceful=whole, timeout_s=timeout)
        if self.link_listener is not None:
            self.link_listener.close()
        deadline = time.monotonic() + STOP_WAIT_S  # they look at the store every 0.2 s, then exit at once
        for supervisor in self.supervisors:
            while supervisor.process is not None and supervisor.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        for supervisor in self.supervisors:
            if supervisor.process is not None and supervisor.process.poll() is None:
                log.warning("%s (pid %d) did not leave within %.1f s of the service closing: killing it",
                            supervisor.name, supervisor.process.pid, STOP_WAIT_S)
            supervisor.kill()
        self.rendezvous.close()
        if self._config_file:
            shutil.rmtree(os.path.dirname(self._config_file), ignore_errors=True)


def _refuse_exit(supervisor: WorkerSupervisor, ended: Loss) -> bool:
    """At start-up a worker that exits fails the start at once: nothing is started again."""
    raise GenerationError([supervisor.index], str(ended.during("while the cluster started")), named=True)


def _start_workers(cfg: ChatLoopConfig, config_file: str, coordinator: str) -> list[WorkerSupervisor]:
    supervisors = [WorkerSupervisor.for_worker(cfg, k, config_file, coordinator)
                   for k in range(cfg.cluster.num_workers)]
    for supervisor in supervisors:
        supervisor.start()
    return supervisors
