"""The coordinator's side of the cluster: worker processes, the store, the RPC world, the RPC pipeline.

Rank 0 is the coordinator (RPC name ``coordinator``), rank k is ``worker{k-1}``. On one host
the coordinator starts the worker processes itself and hosts the store on
``cluster.master_addr:cluster.master_port`` (loopback by default); under torchrun every rank
meets in torchrun's store. Each rank talks to the others through the interface that routes to
the coordinator (:func:`~chatloop.network.rank_interfaces`), so several hosts work without
GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME. A worker that exits while the cluster starts fails the
start at once, with its exit status and the last lines it wrote.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import secrets
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import torch.distributed.rpc as rpc

from ..config import ChatLoopConfig
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
from ..engine.pipeline import stage_name
from ..network import rank_address, rank_interfaces, under_torchrun
from ..stage import stage_specs
from . import remote_stage
from .faults import GenerationError, Loss
from .healing import State, Watchdog
from .links import Link, LinkListener
from .members import not_back
from .processes import WorkerProcess, write_config
from .rendezvous import Rendezvous, RendezvousError, init_rpc_generation, shutdown_rpc
from .results import COORDINATOR, Results
from .supervisor import WorkerSupervisor
from .worker import backend_options

__all__ = ["ClusterListener", "GenerationError", "RpcCluster", "RpcPipeline", "StartupError"]

log = logging.getLogger(__name__)
# torch's RPC builds its barrier on a Gloo group through an API torch itself deprecates; the
# warning is about torch's code, not ours, and each rank printed it on every start.
warnings.filterwarnings("ignore", message="You are using a Backend .*ProcessGroupGloo", category=UserWarning)

UNHEALTHY_AFTER_FAILURES = 3
"""A stage whose last this many micro-batches all failed in it is reported down."""
DEADLINE_CHECK_S = 0.25
"""How often the coordinator looks for steps past ``cluster.rpc_timeout_s``."""
STOP_WAIT_S = 1.5
"""At shutdown, how long the workers this process started get to leave by themselves before they are killed."""


class StartupError(RuntimeError):
    """The cluster could not start: the message names the rank and what to change."""


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
        link: Link, results: Results, generation: int = 0,
    ) -> None:
        super().__init__(names, num_blocks, block_size)
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
        futures = [rpc.rpc_async(name, remote_stage.alive, timeout=timeout) for name in self.stage_names]
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
        futures = [rpc.rpc_async(name, remote_stage.progress, args=(mb_id,), timeout=timeout)
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
                rpc.rpc_async(name, remote_stage.cancel, args=(mb_ids,), timeout=2.0)
            except Exception:  # an unreachable stage computes nothing anyway
                pass

    # ---- the Pipeline interface -----------------------------------------------------------------
    def describe(self, timeout: float = 5.0) -> list[StageReport]:
        futures = [rpc.rpc_async(name, remote_stage.describe, timeout=timeout) for name in self.stage_names]
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
        futures = [rpc.rpc_async(name, remote_stage.take_timings, timeout=self.timeout) for name in self.stage_names]
        return {name: [StageTiming(*t) for t in f.wait()] for name, f in zip(self.stage_names, futures)}

    def inject_failure(self, stage: int, message: str = "injected", stall_s: float = 0.0) -> None:
        """Test hook: make ``stage`` fail its next micro-batch (:func:`~chatloop.stage.fault_injection.fail_next`)."""
        rpc.rpc_sync(self.stage_names[stage], remote_stage.fail_next, args=(message, stall_s))

    def close(self) -> None:
        self._closed.set()
        self._diagnose.shutdown(wait=False, cancel_futures=True)
        self.link.close()


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

    After that a watchdog (:mod:`~chatloop.runtime.healing`) notices lost workers and rebuilds the
    pipeline in a new generation: the workers it started are started again, the others (torchrun,
    other hosts) are waited for.
    """

    def __init__(self, cfg: ChatLoopConfig, rendezvous: Rendezvous, partitions_dir: str) -> None:
        self.cfg = cfg
        self.rendezvous = rendezvous
        self.partitions_dir = partitions_dir
        self.supervisors: list[WorkerSupervisor] = []
        """The workers this process started (on one host); empty under torchrun."""
        self.generation = 0
        self.pipeline: RpcPipeline | None = None
        self.stage_reports: list[StageReport] = []
        self.members: dict[int, dict] = {}
        """What each worker said when it joined the current generation (pid, host, container: see
        :mod:`~chatloop.runtime.members`)."""
        self.known: dict[int, dict] = {}
        """What each worker said when it last announced itself, in any generation: a lost worker's messages name
        it (its container) and say how to bring it back."""
        self.closing = threading.Event()
        """Set when :meth:`shutdown` begins: a generation being formed stops waiting, nothing is restarted."""
        self.listener: ClusterListener | None = None
        self.results = Results()
        """The micro-batches in flight and the stages' failure reports, across generations."""
        self.results_listener: LinkListener | None = None
        """Where the last stage delivers token ids (this rank's interface, an ephemeral port)."""
        self.watchdog: Watchdog | None = None
        self._observers: list = []
        self._config_file: str | None = None
        self._shut = False
        self._rpc_up = False  # this rank's RPC agent belongs to a formed generation

    @property
    def workers(self) -> list[WorkerProcess]:
        return [s.process for s in self.supervisors if s.process is not None]

    @classmethod
    def start(cls, cfg: ChatLoopConfig, partitions_dir: str, prepare: Callable[[], object] | None = None) -> RpcCluster:
        """Check and split (``prepare``), start or meet the workers, start RPC, load the stages."""
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
            cluster.form(0, deadline, on_exit=cluster._refuse_exit, waited=f"cluster.startup_timeout_s={timeout:g} s")
            cluster.load_stages(deadline)
        except GenerationError as e:
            cluster.shutdown()
            raise StartupError(str(e)) from None
        except BaseException:
            cluster.shutdown()
            raise
        if cfg.cluster.self_healing:
            cluster.watchdog = Watchdog(cluster, cfg.cluster)
        return cluster

    def _refuse_exit(self, supervisor: WorkerSupervisor, ended: Loss) -> bool:
        """At start-up a worker that exits fails the start at once: nothing is started again."""
        raise GenerationError([supervisor.index], str(ended.during("while the cluster started")), named=True)

    # ---- forming a generation ------------------------------------------------------------------
    def form(self, generation: int, deadline: float,
             on_exit: Callable[[WorkerSupervisor, Loss], bool], waited: str = "the time allowed",
             join_deadline: float | None = None) -> None:
        """Wait for every worker to announce itself (until ``join_deadline``, by default ``deadline``), then start
        RPC for ``generation`` with them (until ``deadline``).

        ``on_exit(supervisor, how)`` handles a started worker that exited meanwhile: True if it was
        started again, else it raises :class:`GenerationError`. ``waited`` names the limit that the join deadline
        comes from, for the error ('cluster.recovery_timeout_s=60 s').
        """
        cfg, rendezvous = self.cfg, self.rendezvous
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
                raise self._not_joined(missing, waited)
            time.sleep(0.05)
        self.members = ready
        rendezvous.start(generation)
        options = backend_options(cfg, cfg.cluster.startup_timeout_s)
        self._while_watching(
            lambda: init_rpc_generation(COORDINATOR, 0, n + 1, generation, rendezvous, options),
            deadline, on_exit,
        )
        self._rpc_up = True
        self.generation = generation

    def _not_joined(self, missing: list[int], waited: str) -> GenerationError:
        """Why ``missing`` did not join in time, and what to do: a worker that joined before is named by what it
        said then ('worker2 (container chatloop-worker-2) ... bring it back with `docker start chatloop-worker-2`');
        one that never joined, by how such workers start."""
        where = self.rendezvous.where
        reasons = {k: why for k in missing if (why := not_back(k, self.known.get(k), where, waited)) is not None}
        never = [k for k in missing if k not in reasons]
        if never:
            if under_torchrun():
                how = "start them (rank k+1 is worker k)"
            elif self.cfg.cluster.launch == "external":
                how = (f"start each with `chatloop-worker --config configs/worker-config-N.yaml --coordinator "
                       f"{where}` (worker N)")
            else:
                how = "they were started here: see their output above"
            text = (f"{', '.join(stage_name(k) for k in never)} did not join the coordinator at {where} in time "
                    f"({waited}): {how}, or check that they can reach this address")
            reasons.update({k: text for k in never})
        for k in missing:
            failure = self.rendezvous.failure(k)
            if failure:
                reasons[k] += f" ({failure})"
        message = "; ".join(dict.fromkeys(reasons[k] for k in missing))  # one sentence for those never joined
        return GenerationError(missing, message, reasons=reasons, named=True)

    def _check_exits(self, on_exit: Callable[[WorkerSupervisor, Loss], bool]) -> None:
        for supervisor in self.supervisors:
            ended = supervisor.exited()
            if ended is not None:
                on_exit(supervisor, ended)

    def _while_watching(self, call: Callable[[], None], deadline: float,
                        on_exit: Callable[[WorkerSupervisor, Loss], bool]) -> None:
        """Run ``call`` in a thread; stop waiting for it if a worker we started exits meanwhile."""
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                call()
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        thread = threading.Thread(target=run, daemon=True, name="chatloop-init")
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            self._check_exits(on_exit)
            if self.closing.is_set():
                raise GenerationError(list(range(self.cfg.cluster.num_workers)), "the service is stopping")
            if time.monotonic() > deadline:
                raise GenerationError(list(range(self.cfg.cluster.num_workers)), (
                    f"RPC did not start in time (store {self.rendezvous.where})"))
        if outcome and outcome[0] is not None:
            raise GenerationError(list(range(self.cfg.cluster.num_workers)), (
                f"RPC start-up through {self.rendezvous.where} failed: {first_line(outcome[0])}"))

    def load_stages(self, deadline: float) -> None:
        """Every worker builds (or, in a later generation, keeps) its stage; the stages are chained."""
        cfg = self.cfg
        specs = stage_specs(cfg, self.partitions_dir)
        names = [spec.name for spec in specs]
        timeout = max(1.0, deadline - time.monotonic())
        futures = [rpc.rpc_async(spec.name, remote_stage.create_stage, args=(spec, cfg.cluster.rpc_timeout_s),
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
                               cfg.cluster.progress_deadline_s, link, self.results, generation=self.generation)
        if self.pipeline is not None:  # the step observers (benchmarks) carry over
            pipeline._observers = self.pipeline._observers
        pipeline.on_silent = self._stages_silent
        self.pipeline = pipeline
        self.results.on_failure = pipeline.failed
        for r in reports:
            log.info("%s: layers %s, %d KV blocks, pid %s on %s, cores %s, %s threads, CPU capability %s",
                     r.name, r.layers, r.num_blocks, r.pid, r.host, list(r.cores or ()), r.threads, r.simd)

    def _link_stages(self, names: list[str], reports: list[StageReport]) -> Link:
        """Chain the stages with this generation's secret, last first (each admits it before its caller links);
        the link into the first."""
        if self.results_listener is None:
            self.results_listener = LinkListener(rank_address(dict(os.environ)), self.results.serve_call,
                                                 name="results")
        secret = secrets.token_hex(16)
        self.results_listener.admit(secret)
        addresses = [r.link_address for r in reports] + [self.results_listener.address]
        for k in reversed(range(len(names))):
            downstream = names[k + 1] if k + 1 < len(names) else ""
            try:
                rpc.rpc_sync(names[k], remote_stage.connect,
                             args=(downstream, addresses[k + 1], secret, self.results_listener.address))
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
                                                    generation=self.generation, cause=reason))

    def _stages_silent(self, indices: list[int], reason: str, generation: int) -> None:
        if self.watchdog is not None:
            self.watchdog.report({k: reason for k in indices}, generation)

    def leave_generation(self) -> None:
        """End the current generation: steps in flight fail, this rank's RPC agent goes; workers rejoin the next."""
        if self.pipeline is not None:
            self.pipeline.close()
        self.results.on_failure = None
        self.results.fail_all(StageLostError(f"the pipeline of generation {self.generation} was lost",
                                        generation=self.generation))
        try:
            self.rendezvous.end(self.generation)
        except Exception as e:
            log.warning("could not end generation %d in the store: %s", self.generation, first_line(e))
        self.pipeline = None
        self._rpc_up = False
        if not shutdown_rpc(graceful=False, timeout_s=10):
            log.warning("the coordinator's RPC agent of generation %d did not stop within 10 s", self.generation)

    def abandon(self, generation: int) -> None:
        """``generation`` did not form or load: the workers waiting to start it move on to the next, and this rank's
        RPC agent, if it started, goes."""
        self.rendezvous.end(generation)
        self.generation = generation
        if self._rpc_up:
            shutdown_rpc(graceful=False, timeout_s=10)
            self._rpc_up = False

    def announced(self, index: int) -> dict | None:
        """What worker ``index`` said when it last joined (pid, host, container, command), if it ever did."""
        return self.known.get(index) or self.members.get(index)

    def heartbeat(self) -> dict[int, str]:
        """{stage: why} for the current pipeline's stages that give no sign of life ({} between generations)."""
        if self.pipeline is None:
            return {}
        return self.pipeline.heartbeat(self.cfg.cluster.heartbeat_timeout_s)

    def evict(self, index: int) -> None:
        """Tell worker ``index``'s supervisor elsewhere (a torchrun rank) to kill and replace it."""
        pid = (self.announced(index) or {}).get("pid")
        if pid is not None:
            self.rendezvous.evict(index, int(pid))

    def describe(self, timeout: float) -> list[StageReport]:
        """Every stage's report, with the container its worker runs in; while the cluster heals, the lost stages
        say so (and why, and how to bring them back)."""
        if self.watchdog is not None and self.watchdog.lost:
            lost = dict(self.watchdog.lost)
            state = self.watchdog.state
            reports = [replace(StageReport.down(name, k, f"{state.value}: {lost[k]}"),
                               recovering=state is State.RECOVERING)
                       if k in lost else StageReport(name=name, index=k, host=(self.members.get(k) or {}).get("host"))
                       for k, name in enumerate(self.stage_names)]
        elif self.pipeline is None:
            reports = [StageReport.down(name, k, "the cluster is stopped") for k, name in enumerate(self.stage_names)]
        else:
            reports = self.pipeline.describe(timeout)
        return [replace(r, container=(self.known.get(r.index) or {}).get("container")) for r in reports]

    @property
    def stage_names(self) -> list[str]:
        return [stage_name(k) for k in range(self.cfg.cluster.num_workers)]

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
        if self.pipeline is not None:
            self.pipeline.close()
        self.pipeline = None
        whole = (self.watchdog is None or self.watchdog.state is State.SERVING) and all(
            s.process is None or s.process.poll() is None for s in self.supervisors)
        try:
            self.rendezvous.close_service(graceful=whole)
            self.rendezvous.end(self.generation)
        except Exception as e:  # the store is ours on one host; under torchrun it may be gone already
            log.debug("could not tell the workers to leave: %s", first_line(e))
        if self.results_listener is not None:
            self.results_listener.close()
        if not shutdown_rpc(graceful=whole, timeout_s=timeout):
            log.warning("the coordinator's RPC agent did not stop within %.0f s", timeout)
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


def _start_workers(cfg: ChatLoopConfig, config_file: str, coordinator: str) -> list[WorkerSupervisor]:
    supervisors = [WorkerSupervisor.for_worker(cfg, k, config_file, coordinator)
                   for k in range(cfg.cluster.num_workers)]
    for supervisor in supervisors:
        supervisor.start()
    return supervisors


def _down(report: StageReport, error: str) -> StageReport:
    return replace(report, error=error)
