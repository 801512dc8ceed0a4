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
import gc
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch.distributed.rpc as rpc

from ..config import API_KEY_ENV, ChatLoopConfig
from ..engine import MicroBatch, Pipeline, StageError, StageReport, StageTiming
from ..engine.runner import stage_specs
from ..network import rank_interfaces
from ..worker_settings import worker_environment
from . import results
from .processes import WorkerProcess, write_config
from .remote_stage import RemoteStage, create_stage
from .rendezvous import Rendezvous, RendezvousError, init_rpc_generation, shutdown_rpc
from .worker import backend_options

__all__ = ["RpcCluster", "RpcPipeline", "StartupError", "under_torchrun"]

log = logging.getLogger(__name__)
# torch's RPC builds its barrier on a Gloo group through an API torch itself deprecates; the
# warning is about torch's code, not ours, and each rank printed it on every start.
warnings.filterwarnings("ignore", message="You are using a Backend .*ProcessGroupGloo", category=UserWarning)

LOST = ("timeout", "timed out", "ran for more than", "eof", "epipe", "econnreset", "econnrefused", "pipe closed",
        "connection reset", "connection refused", "broken pipe", "unreachable", "no route", "shut down")
"""Words of transport errors: the step did not fail in a stage, it was lost between them."""
UNHEALTHY_AFTER_FAILURES = 3
"""A stage whose last this many micro-batches all failed in it is reported down."""


class StartupError(RuntimeError):
    """The cluster could not start: the message names the rank and what to change."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


class RpcPipeline(Pipeline):
    """Micro-batches enter worker0; the last worker sends their token ids back here (``results.deliver``).

    A step that times out or is lost in transport is located (each stage says how far it got)
    and cancelled on every stage; its error names the stage that did not finish it. ``describe``
    reports a stage down when it does not answer, has computed one micro-batch for longer than
    the progress deadline, or failed its last micro-batches.
    """

    def __init__(
        self, stages: list[rpc.RRef], names: list[str], num_blocks: int, block_size: int, timeout: float,
        progress_deadline_s: float,
    ) -> None:
        super().__init__(names, num_blocks, block_size)
        self.stages = stages
        self.timeout = timeout
        self.progress_deadline_s = progress_deadline_s
        self._sent: dict[int, float] = {}  # micro-batches in flight: when each was sent (monotonic)
        self._diagnose = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chatloop-diagnose")

    def _submit(self, mb: MicroBatch) -> concurrent.futures.Future:
        result = results.expect(mb.id)
        first = self.stages[0]
        names = self.stage_names
        self._sent[mb.id] = time.monotonic()
        try:
            args = (first, mb.id, mb.token_ids, mb.batch.to_payload(), mb.sampling)
            chain = rpc.rpc_async(first.owner(), RemoteStage.forward, args=args, timeout=self.timeout)
        except Exception as e:
            self._sent.pop(mb.id, None)
            results.fail(mb.id, StageError(f"{names[0]} is unreachable: {e}"))
            return result

        def done(f) -> None:  # the chain completes after the tokens arrived, or with the failing stage's error
            self._sent.pop(mb.id, None)
            try:
                results.raise_failure(f, names[0])
            except StageError as e:
                if _lost(e):  # find out where, off the RPC thread (it asks every stage)
                    self._diagnose.submit(self._fail_lost, mb.id, e)
                else:
                    results.fail(mb.id, e)
            else:
                lost = StageError(f"{names[-1]} finished micro-batch {mb.id}, but its tokens never arrived")
                results.fail(mb.id, lost)

        chain.add_done_callback(done)
        return result

    # ---- where a step is -----------------------------------------------------------------------
    def locate(self, mb_id: int, timeout: float | None = None) -> list[tuple[str, float] | str]:
        """Each stage's (state, seconds) for micro-batch ``mb_id``, or why it did not answer."""
        timeout = timeout or max(1.0, min(5.0, self.timeout / 4))
        futures = [stage.rpc_async(timeout=timeout).progress(mb_id) for stage in self.stages]
        out: list[tuple[str, float] | str] = []
        for f in futures:
            try:
                out.append(tuple(f.wait()))  # type: ignore[arg-type]
            except Exception as e:
                out.append(_first_line(e))
        return out

    def blame(self, mb_id: int, where: list[tuple[str, float] | str]) -> str:
        """Which stage holds micro-batch ``mb_id`` up, from :meth:`locate`'s answer."""
        silent = [name for name, state in zip(self.stage_names, where) if isinstance(state, str)]
        if silent:
            return (f"{', '.join(silent)} {'does' if len(silent) == 1 else 'do'} not answer (stopped, overloaded or "
                    f"unreachable): micro-batch {mb_id} was lost")
        for name, (state, seconds) in zip(self.stage_names, where):  # type: ignore[misc]
            if state not in ("done", "forwarded") or (name == self.stage_names[-1] and state != "done"):
                return f"{name} did not finish micro-batch {mb_id} ({state} for {seconds:.1f} s)"
        return f"micro-batch {mb_id} passed every stage, but its tokens never reached the coordinator"

    def _fail_lost(self, mb_id: int, error: StageError) -> None:
        where = self.locate(mb_id)
        self.cancel([mb_id])
        text = _first_line(error)
        # The error names the stage the coordinator called (worker0), not the one that held the step up.
        reason = (f"no answer within cluster.rpc_timeout_s={self.timeout:g} s" if "ran for more than" in text
                  else re.sub(r"^worker\d+: ", "", text))
        results.fail(mb_id, StageError(f"{self.blame(mb_id, where)} ({reason})"))

    def cancel(self, mb_ids: list[int]) -> None:
        """Tell every stage to skip these micro-batches (best effort: a stage that does not answer is skipped)."""
        for stage in self.stages:
            try:
                stage.rpc_async(timeout=2.0).cancel(mb_ids)
            except Exception:  # an unreachable stage computes nothing anyway
                pass

    # ---- the Pipeline interface -----------------------------------------------------------------
    def describe(self, timeout: float = 5.0) -> list[StageReport]:
        futures = [stage.rpc_async(timeout=timeout).describe() for stage in self.stages]
        reports = []
        for k, (name, f) in enumerate(zip(self.stage_names, futures)):
            try:
                reports.append(self._judge(f.wait()))
            except Exception as e:
                reports.append(StageReport.down(name, k, f"no answer within {timeout:g} s: {_first_line(e)}"))
        return self._judge_progress(reports)

    def _judge(self, report: StageReport) -> StageReport:
        """A stage that answers but does not get on with its work is down too."""
        if report.computing_s is not None and report.computing_s > self.progress_deadline_s:
            return _down(report, f"no progress: one micro-batch has been computing for {report.computing_s:.0f} s "
                                 f"(cluster.progress_deadline_s={self.progress_deadline_s:g})")
        if (report.consecutive_failures or 0) >= UNHEALTHY_AFTER_FAILURES:
            return _down(report, f"its last {report.consecutive_failures} micro-batches failed: {report.last_error}")
        return report

    def _judge_progress(self, reports: list[StageReport]) -> list[StageReport]:
        """The oldest micro-batch in flight, if it is past the deadline, names the stage that holds it up."""
        now = time.monotonic()
        late = [(sent, mb_id) for mb_id, sent in list(self._sent.items()) if now - sent > self.progress_deadline_s]
        if not late or not all(r.up for r in reports):
            return reports
        sent, mb_id = min(late)
        where = self.locate(mb_id)
        for k, state in enumerate(where):
            if isinstance(state, str) or state[0] not in ("done", "forwarded"):
                reports[k] = _down(reports[k], f"no progress: {self.blame(mb_id, where)}, sent {now - sent:.0f} s ago "
                                               f"(cluster.progress_deadline_s={self.progress_deadline_s:g})")
                break
        return reports

    def take_timings(self) -> dict[str, list[StageTiming]]:
        futures = [stage.rpc_async(timeout=self.timeout).take_timings() for stage in self.stages]
        return {name: [StageTiming(*t) for t in f.wait()] for name, f in zip(self.stage_names, futures)}

    def inject_failure(self, stage: int, message: str = "injected", stall_s: float = 0.0) -> None:
        self.stages[stage].rpc_sync().fail_next(message, stall_s)

    def close(self) -> None:
        self._diagnose.shutdown(wait=False, cancel_futures=True)


class RpcCluster:
    """The coordinator's view of the ranks; ``start`` returns once every stage has loaded."""

    def __init__(self, cfg: ChatLoopConfig, rendezvous: Rendezvous, workers: list[WorkerProcess],
                 config_file: str | None = None) -> None:
        self.cfg = cfg
        self.rendezvous = rendezvous
        self.workers = workers
        self.generation = 0
        self.pipeline: RpcPipeline | None = None
        self.stage_reports: list[StageReport] = []
        self._config_file = config_file
        self._shut = False

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
        cluster = cls(cfg, rendezvous, [])
        try:
            if not under_torchrun():
                cluster._config_file = str(write_config(cfg))
                cluster.workers = _start_workers(cfg, cluster._config_file, rendezvous.where)
            cluster._form(0)
            cluster._load_stages(partitions_dir)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    # ---- forming a generation ------------------------------------------------------------------
    def _form(self, generation: int) -> None:
        """Wait for every worker to announce itself, then start RPC for ``generation`` with them."""
        cfg, rendezvous = self.cfg, self.rendezvous
        n = cfg.cluster.num_workers
        rendezvous.open_generation(generation)
        deadline = time.monotonic() + cfg.cluster.startup_timeout_s
        seen: set[int] = set()
        while True:
            ready = rendezvous.ready(generation, n)
            for k in sorted(set(ready) - seen):
                log.info("worker%d joined (pid %s on %s)", k, ready[k].get("pid"), ready[k].get("host"))
            seen = set(ready)
            if len(ready) == n:
                break
            self._check_workers("while the cluster started")
            if time.monotonic() > deadline:
                missing = ", ".join(f"worker{k}" for k in range(n) if k not in ready)
                raise StartupError(
                    f"{missing} did not join the coordinator at {rendezvous.where} within "
                    f"cluster.startup_timeout_s={cfg.cluster.startup_timeout_s:g} s: start them (rank k+1 is worker "
                    "k), or check that they can reach this address"
                )
            time.sleep(0.05)
        rendezvous.start(generation)
        options = backend_options(cfg, cfg.cluster.startup_timeout_s)
        self._while_watching(
            lambda: init_rpc_generation(results.COORDINATOR, 0, n + 1, generation, rendezvous, options),
            deadline, "while RPC started",
        )
        self.generation = generation

    def _check_workers(self, when: str) -> None:
        for worker in self.workers:
            if worker.poll() is not None:
                raise StartupError(f"{worker.name} (pid {worker.pid}) {worker.exit_description()} {when}; its last "
                                   f"output:\n{worker.tail() or '(nothing)'}")

    def _while_watching(self, call: Callable[[], None], deadline: float, when: str) -> None:
        """Run ``call`` in a thread; fail at once if a worker we started exits meanwhile."""
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
            self._check_workers(when)
            if time.monotonic() > deadline:
                raise StartupError(f"RPC did not start within cluster.startup_timeout_s="
                                   f"{self.cfg.cluster.startup_timeout_s:g} s (store {self.rendezvous.where})")
        if outcome and outcome[0] is not None:
            raise StartupError(f"RPC start-up through {self.rendezvous.where} failed: {_first_line(outcome[0])}")

    def _load_stages(self, partitions_dir: str) -> None:
        cfg = self.cfg
        specs = stage_specs(cfg, partitions_dir)
        names = [spec.name for spec in specs]
        stages = [
            rpc.remote(spec.name, create_stage, args=(spec, cfg.cluster.rpc_timeout_s),
                       timeout=cfg.cluster.startup_timeout_s)
            for spec in specs
        ]
        reports: list[StageReport] = []
        for k, (name, stage) in enumerate(zip(names, stages)):
            try:
                reports.append(stage.rpc_sync(timeout=cfg.cluster.startup_timeout_s).describe())
            except Exception as e:
                self._check_workers("while it loaded its stage")
                raise StartupError(f"{name} could not load its stage: {_first_line(e)}") from None
            assert reports[k].name == name
        for k, stage in enumerate(stages):
            nxt = stages[k + 1] if k + 1 < len(stages) else None
            stage.rpc_sync().connect(nxt, names[k + 1] if nxt else "")
        self.stage_reports = reports
        num_blocks = min(r.num_blocks or 0 for r in reports)
        self.pipeline = RpcPipeline(stages, names, num_blocks, cfg.cache.block_size, cfg.cluster.rpc_timeout_s,
                                    cfg.cluster.progress_deadline_s)
        for r in reports:
            log.info("%s: layers %s, %d KV blocks, pid %s on %s, cores %s, %s threads, CPU capability %s",
                     r.name, r.layers, r.num_blocks, r.pid, r.host, list(r.cores or ()), r.threads, r.simd)

    # ---- stopping ------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every rank within about ``timeout`` seconds; kill the workers we started that do not stop."""
        if self._shut:
            return
        self._shut = True
        if self.pipeline is not None:
            self.pipeline.close()
        self.pipeline = None  # its RRefs go before the agent does: no leak warnings
        gc.collect()
        try:
            self.rendezvous.close_service()
            self.rendezvous.end(self.generation)
        except Exception as e:  # the store is ours on one host; under torchrun it may be gone already
            log.debug("could not tell the workers to leave: %s", _first_line(e))
        if not shutdown_rpc(graceful=True, timeout_s=timeout):
            log.warning("RPC shutdown did not finish in %.0f s: stopping the workers", timeout)
        deadline = time.monotonic() + 5
        for worker in self.workers:
            while worker.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            worker.stop(timeout_s=2)
        self.rendezvous.close()
        if self._config_file:
            shutil.rmtree(os.path.dirname(self._config_file), ignore_errors=True)


def _start_workers(cfg: ChatLoopConfig, config_file: str, coordinator: str) -> list[WorkerProcess]:
    env = {**os.environ, **worker_environment(cfg.worker)}  # read when a worker imports torch
    env.pop(API_KEY_ENV, None)  # a worker has no use for the HTTP key
    return [
        WorkerProcess(k, ["--index", str(k), "--config", config_file, "--coordinator", coordinator,
                          "--parent-pid", str(os.getpid())], {**env, "CHATLOOP_WORKER_INDEX": str(k)})
        for k in range(cfg.cluster.num_workers)
    ]


def _lost(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in LOST)


def _down(report: StageReport, error: str) -> StageReport:
    return replace(report, error=error)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # RPC wraps a remote exception's traceback; its last line holds the message.
    useful = [line for line in lines if "Error" in line and ":" in line]
    return (useful[-1] if useful else lines[-1] if lines else repr(e)).strip()
