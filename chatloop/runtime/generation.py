"""One generation: one torch RPC world between the coordinator and every worker, from forming to leaving.

A generation is used once: :meth:`Generation.form` waits for every worker to announce itself and starts RPC with
them, :meth:`Generation.load` has each worker build (or keep) its stage and chains them into a pipeline,
:meth:`Generation.leave` ends it (its steps fail, the workers are told, this rank's RPC agent goes). It owns what
lives and dies with that world: its members (what each worker said when it joined), its results registry (the
micro-batches in flight), its pipeline and the links into it. What outlives it (the workers this process started,
the store, the coordinator's link listener, what every worker ever said) belongs to the cluster
(:class:`~chatloop.runtime.cluster.RpcCluster`) and is lent to each generation; the watchdog
(:mod:`~chatloop.runtime.healing`) replaces a lost generation by the next.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed.rpc as rpc

from ..config import ChatLoopConfig
from ..engine import StageLostError, StageReport, first_line
from ..engine.pipeline import StepObserver, smallest_window_pool, stage_name
from ..models import LayerRange
from ..network import under_torchrun
from ..partition import Manifest, PlanError
from ..partition.placement import HostFigures, Placement
from ..stage import StageSpec, stage_specs
from ..stage.planning import figures_from_files, plan_specs
from ..stage.probe import round_trip_s
from . import worker_host
from .faults import GenerationError, Loss
from .links import Link, LinkListener
from .members import not_back
from .rendezvous import Rendezvous, init_rpc_generation, shutdown_rpc
from .results import COORDINATOR, Results
from .rpc_pipeline import RpcPipeline
from .supervisor import WorkerSupervisor
from .worker import backend_options

__all__ = ["Generation", "OnExit", "not_joined", "probe_workers"]

log = logging.getLogger(__name__)

OnExit = Callable[[WorkerSupervisor, Loss], bool]
"""Handles a worker this process started that exited while a generation formed: True if it was started again,
else it raises :class:`GenerationError`."""


class Generation:
    """Generation ``number`` of the cluster's RPC world (see the module's docstring).

    Lent by the cluster: ``cfg``, ``rendezvous`` (the store), ``partitions_dir``, ``supervisors`` (the workers
    this process started; empty under torchrun), ``known`` (what each worker said when it last joined, in any
    generation: updated here as workers join), ``closing`` (set when the service stops: a generation being formed
    stops waiting), ``listener`` (where the last stage delivers token ids and the stages report failures: the
    cluster routes its messages to the current generation's :attr:`results`), ``observers`` (the step observers,
    carried from pipeline to pipeline) and ``on_silent`` (told which stages a lost step found silent, and in which
    generation).
    """

    def __init__(
        self, number: int, cfg: ChatLoopConfig, rendezvous: Rendezvous, *, partitions_dir: str,
        supervisors: Sequence[WorkerSupervisor] = (), known: dict[int, dict] | None = None,
        closing: threading.Event | None = None, listener: LinkListener | None = None,
        observers: list[StepObserver] | None = None,
        on_silent: Callable[[list[int], str, int], None] | None = None,
    ) -> None:
        self.number = number
        self.cfg = cfg
        self.rendezvous = rendezvous
        self.partitions_dir = partitions_dir
        self.supervisors = supervisors
        self.known = known if known is not None else {}
        self.closing = closing or threading.Event()
        self.listener = listener
        self.observers = observers if observers is not None else []
        self.on_silent = on_silent
        self.members: dict[int, dict] = {}
        """What each worker said when it joined this generation (pid, host, container: :mod:`.members`)."""
        self.results = Results()
        """This generation's micro-batches in flight and its stages' failure reports."""
        self.pipeline: RpcPipeline | None = None
        """Once loaded, until left."""
        self.stage_reports: list[StageReport] = []
        """What each stage said when it loaded."""
        self.placement: Placement | None = None
        """Under cluster.plan=auto, the plan this generation loaded (the status page shows it)."""
        self.plan_figures: list[HostFigures] = []
        """The figures it was planned from, in chain order."""
        self.rpc_up = False
        """This rank's RPC agent belongs to this generation (it formed, and has not been left)."""
        self.left = False

    # ---- form ------------------------------------------------------------------------------------
    def form(self, deadline: float, on_exit: OnExit, waited: str = "the time allowed",
             join_deadline: float | None = None) -> None:
        """Wait for every worker to announce itself (until ``join_deadline``, by default ``deadline``), then start
        RPC with them (until ``deadline``); :class:`GenerationError` if that cannot be done.

        ``on_exit`` handles a worker this process started that exits meanwhile (:data:`OnExit`). ``waited`` names
        the limit the join deadline comes from, for the error ('cluster.recovery_timeout_s=60 s').
        """
        cfg, rendezvous, generation = self.cfg, self.rendezvous, self.number
        n = cfg.cluster.num_workers
        rendezvous.open_generation(generation)
        seen: set[int] = set()
        while True:
            ready = rendezvous.ready(generation, n)
            for k in sorted(set(ready) - seen):
                container = ready[k].get("container")
                log.info("worker%d joined generation %d (pid %s on %s%s)", k, generation, ready[k].get("pid"),
                         ready[k].get("host"), f", container {container}" if container else "")
                self.known[k] = ready[k]
            seen = set(ready)
            if len(ready) == n:
                break
            self._check_exits(on_exit)
            missing = [k for k in range(n) if k not in ready]
            if self.closing.is_set():
                raise GenerationError(missing, "the service is stopping")
            if time.monotonic() > (deadline if join_deadline is None else join_deadline):
                raise not_joined(missing, self.known, rendezvous, cfg.cluster.launch, waited)
            time.sleep(0.05)
        self.members = ready
        rendezvous.start(generation)
        options = backend_options(cfg, cfg.cluster.startup_timeout_s)
        self._while_watching(
            lambda: init_rpc_generation(COORDINATOR, 0, n + 1, generation, rendezvous, options),
            deadline, on_exit,
        )
        self.rpc_up = True

    def _check_exits(self, on_exit: OnExit) -> None:
        for supervisor in self.supervisors:
            ended = supervisor.exited()
            if ended is not None:
                on_exit(supervisor, ended)

    def _while_watching(self, call: Callable[[], None], deadline: float, on_exit: OnExit) -> None:
        """Run ``call`` in a thread; stop waiting for it if a worker we started exits meanwhile."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call()
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        everyone = list(range(self.cfg.cluster.num_workers))
        thread = threading.Thread(target=run, daemon=True, name="chatloop-init")
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            self._check_exits(on_exit)
            if self.closing.is_set():
                raise GenerationError(everyone, "the service is stopping")
            if time.monotonic() > deadline:
                raise GenerationError(everyone, f"RPC did not start in time (store {self.rendezvous.where})")
        if outcome and outcome[0] is not None:
            raise GenerationError(everyone, (
                f"RPC start-up through {self.rendezvous.where} failed: {first_line(outcome[0])}"))

    # ---- load ------------------------------------------------------------------------------------
    def load(self, deadline: float) -> RpcPipeline:
        """Every worker builds (or, in a later generation, keeps) its stage; the stages are chained into this
        generation's pipeline. :class:`GenerationError` if one cannot."""
        cfg = self.cfg
        specs = stage_specs(cfg, self.partitions_dir)
        if cfg.cluster.plan == "auto" and not cfg.cluster.figures:
            specs = self._planned(specs, deadline)
        elif cfg.cluster.plan == "auto":  # stage_specs planned from the files: the same plan again, to show it
            self.plan_figures = figures_from_files(cfg)
            _, self.placement = plan_specs(cfg, specs, self.plan_figures, Manifest.load(Path(self.partitions_dir)))
        names = [spec.name for spec in specs]
        timeout = max(1.0, deadline - time.monotonic())
        futures = [rpc.rpc_async(spec.name, worker_host.create_stage, args=(spec, cfg.cluster.rpc_timeout_s),
                                 timeout=timeout) for spec in specs]
        reports: list[StageReport] = []
        for k, (name, future) in enumerate(zip(names, futures)):
            try:
                reports.append(future.wait())
            except Exception as e:
                ended = next((s.exited() for s in self.supervisors if s.index == k and s.exited()), None)
                raise GenerationError([k], str(ended.during("while it loaded its stage")) if ended
                                      else f"{name} could not load its stage: {first_line(e)}", named=True) from None
        link = self._link_stages(names, reports)
        self.stage_reports = reports
        num_blocks = min(r.num_blocks or 0 for r in reports)
        pipeline = RpcPipeline(names, num_blocks, cfg.cache.block_size, cfg.cluster.rpc_timeout_s,
                               cfg.cluster.progress_deadline_s, link, self.results, generation=self.number,
                               num_window_blocks=smallest_window_pool(r.num_window_blocks for r in reports))
        pipeline._observers = self.observers  # the step observers (benchmarks) carry over
        pipeline.on_silent = self.on_silent
        if self.left or self.closing.is_set():  # left (the service stopped) while it loaded: it serves nothing
            pipeline.close()
            raise GenerationError(list(range(len(names))), "the service is stopping")
        self.pipeline = pipeline
        self.results.on_failure = pipeline.failed
        for r in reports:
            log.info("%s: layers %s, %d KV blocks, pid %s on %s, cores %s, %s threads, CPU capability %s",
                     r.name, r.layers, r.num_blocks, r.pid, r.host, list(r.cores or ()), r.threads, r.simd)
        return pipeline

    def _planned(self, specs: list[StageSpec], deadline: float) -> list[StageSpec]:
        """cluster.plan=auto: every worker probes its host (its speed on one real layer, its memory, its files) and
        the placement gives each its range, at every generation: a worker replaced on another host, or a host come
        back, gets a plan of its own speed (a changed range loads again)."""
        figures, current = probe_workers(specs, max(1.0, deadline - time.monotonic()))
        try:
            planned, self.placement = plan_specs(self.cfg, specs, figures, Manifest.load(Path(self.partitions_dir)),
                                                 current)
        except PlanError as e:
            raise GenerationError(list(range(len(specs))), f"cluster.plan=auto: {e}") from None
        self.plan_figures = figures
        return planned

    def _link_stages(self, names: list[str], reports: list[StageReport]) -> Link:
        """Chain the stages with this generation's secret, last first (each admits it before its caller links);
        the link into the first."""
        listener = self.listener
        if listener is None:
            raise GenerationError(list(range(len(names))), "the coordinator has no link listener to deliver to")
        secret = secrets.token_hex(16)
        listener.admit(secret)
        addresses = [r.link_address for r in reports] + [listener.address]
        for k in reversed(range(len(names))):
            downstream = names[k + 1] if k + 1 < len(names) else ""
            try:
                rpc.rpc_sync(names[k], worker_host.connect,
                             args=(downstream, addresses[k + 1], secret, listener.address))
            except Exception as e:
                raise GenerationError([k], f"{names[k]} could not link to {downstream or COORDINATOR} at "
                                           f"{addresses[k + 1]}: {first_line(e)}", named=True) from None
        try:
            return Link(names[0], addresses[0], secret, on_closed=self._first_link_closed)
        except ConnectionError as e:
            raise GenerationError([0], f"the coordinator could not link to {names[0]}: {e}", named=True) from None

    def _first_link_closed(self, reason: str) -> None:
        if self.pipeline is not None:  # worker0, or a stage after it: located by the pipeline
            self.pipeline.failed(-1, StageLostError(f"{self.pipeline.stage_names[0]} is unreachable: {reason}",
                                                    generation=self.number, cause=reason))

    # ---- while it serves ---------------------------------------------------------------------------
    def heartbeat(self) -> dict[int, str]:
        """{stage: why} for this generation's stages that give no sign of life ({} until loaded, and once left)."""
        pipeline = self.pipeline
        if pipeline is None:
            return {}
        return pipeline.heartbeat(self.cfg.cluster.heartbeat_timeout_s)

    # ---- leave -------------------------------------------------------------------------------------
    def leave(self, graceful: bool = False, timeout_s: float = 10.0) -> None:
        """End this generation, formed or not: its steps in flight fail, the workers are told (those waiting to
        start it move on to the next, those serving it tear their RPC agents down and rejoin), and this rank's
        RPC agent, if it started, goes. ``graceful``: every rank is there and the service closes (see
        :func:`~chatloop.runtime.rendezvous.shutdown_rpc`). Once only."""
        if self.left:
            return
        self.left = True
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()
        self.results.on_failure = None
        self.results.fail_all(StageLostError(f"the pipeline of generation {self.number} was lost",
                                             generation=self.number))
        try:
            self.rendezvous.end(self.number)
        except Exception as e:  # the store is ours on one host; under torchrun it may be gone already
            log.log(logging.DEBUG if self.closing.is_set() else logging.WARNING,
                    "could not end generation %d in the store: %s", self.number, first_line(e))
        if self.rpc_up:
            self.rpc_up = False
            if not shutdown_rpc(graceful=graceful, timeout_s=timeout_s):
                log.warning("the coordinator's RPC agent of generation %d did not stop within %.0f s", self.number,
                            timeout_s)


def not_joined(missing: list[int], known: Mapping[int, Mapping[str, Any]], rendezvous: Rendezvous, launch: str,
               waited: str) -> GenerationError:
    """Why workers ``missing`` did not join in time, and what to do: a worker that joined before is named by what
    it said then ('worker2 (container chatloop-worker-2) ... bring it back with `docker start chatloop-worker-2`');
    one that never joined, by how such workers start (``launch``: ``cluster.launch``)."""
    where = rendezvous.where
    reasons = {k: why for k in missing if (why := not_back(k, known.get(k), where, waited)) is not None}
    never = [k for k in missing if k not in reasons]
    if never:
        if under_torchrun():
            how = "start them (rank k+1 is worker k)"
        elif launch == "external":
            how = (f"start each with `chatloop-worker --config configs/worker-config-N.yaml --coordinator "
                   f"{where}` (worker N)")
        else:
            how = "they were started here: see their output above"
        text = (f"{', '.join(stage_name(k) for k in never)} did not join the coordinator at {where} in time "
                f"({waited}): {how}, or check that they can reach this address")
        reasons.update({k: text for k in never})
    for k in missing:
        failure = rendezvous.failure(k)
        if failure:
            reasons[k] += f" ({failure})"
    message = "; ".join(dict.fromkeys(reasons[k] for k in missing))  # one sentence for those never joined
    return GenerationError(missing, message, reasons=reasons, named=True)


def probe_workers(specs: list[StageSpec], timeout: float) -> tuple[list[HostFigures], list[LayerRange | None]]:
    """Every worker's probe of its host (all at once, as they will compute: workers that share cores measure each
    other's load) with its hop to the next stage (half the round trip of a call from it to the next worker; the last
    stage's, of the coordinator's call to it: it answers the coordinator), and the range each holds now;
    :class:`GenerationError` naming a worker that could not."""
    futures = [rpc.rpc_async(spec.name, worker_host.probe, args=(spec,), timeout=timeout) for spec in specs]
    figures, current = [], []
    for k, (spec, future) in enumerate(zip(specs, futures)):
        try:
            found, held = future.wait()
            if k + 1 < len(specs):
                round_trip = rpc.rpc_sync(spec.name, worker_host.round_trip_to, args=(specs[k + 1].name, timeout),
                                          timeout=timeout)
            else:
                round_trip = round_trip_s(lambda name=spec.name: rpc.rpc_sync(name, worker_host.alive, timeout=timeout))
            figures.append(replace(found, hop_s=round_trip / 2))
            current.append(held)
        except Exception as e:
            raise GenerationError([k], f"{spec.name} could not probe its host: {first_line(e)}", named=True) from None
    return figures, current
