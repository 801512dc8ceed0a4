"""Ranks, rendezvous, the RPC pipeline and shutdown: every torch.distributed.rpc call outside the stage host.

Rank 0 is the coordinator (RPC name ``coordinator``), rank k is ``worker{k-1}``. Under
torchrun the ranks come from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; without it the
coordinator spawns the worker processes itself. The weights load after ``init_rpc``, so a
slow load never trips the rendezvous timeout.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
import time
import warnings

import torch.distributed.rpc as rpc

from ..config import ChatLoopConfig
from ..engine import MicroBatch, Pipeline, StageError, StageReport, StageSpec, StageTiming
from ..engine.runner import stage_specs
from ..worker_settings import apply_worker_settings, worker_environment
from . import results
from .remote_stage import RemoteStage
from .worker_metrics import start_worker_metrics

__all__ = ["RpcCluster", "under_torchrun", "run_worker", "StartupError"]

log = logging.getLogger(__name__)
# torch's RPC builds its barrier on a Gloo group through an API torch itself deprecates; the
# warning is about torch's code, not ours, and each rank printed it on every start.
warnings.filterwarnings("ignore", message="You are using a Backend .*ProcessGroupGloo", category=UserWarning)


class StartupError(RuntimeError):
    """The cluster could not start: the message names the rank and what to change."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _backend_options(cfg: ChatLoopConfig, timeout: float) -> rpc.TensorPipeRpcBackendOptions:
    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=cfg.cluster.num_rpc_threads,
        rpc_timeout=timeout,
        init_method="env://",
        _transports=list(cfg.cluster.rpc_transports),
        _channels=list(cfg.cluster.rpc_channels),
    )


def _watch_parent(parent_pid: int) -> None:
    # A spawned worker must not outlive its coordinator (kill -9, crash): poll and leave.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def run_worker(rank: int, world_size: int, cfg: ChatLoopConfig, parent_pid: int | None = None) -> None:
    """A worker rank: set up the CPU, join the RPC group, serve until the coordinator shuts down."""
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s worker{rank - 1} %(levelname)s %(message)s")
    if parent_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    apply_worker_settings(rank - 1, world_size - 1, cfg.worker.worker_threads, cfg.worker.enable_cpu_pinning)
    backend = _backend_options(cfg, cfg.cluster.startup_timeout_s)
    rpc.init_rpc(f"worker{rank - 1}", rank=rank, world_size=world_size, rpc_backend_options=backend)
    port = cfg.worker.metrics_port + rank - 1
    global _METRICS_PORT
    _METRICS_PORT = port if start_worker_metrics(rank - 1, port) is not None else None
    rpc.shutdown(graceful=True)  # returns once the coordinator shuts down


_METRICS_PORT: int | None = None
"""This worker's Prometheus port, once it serves one."""
_STARTED = False


def _create_stage(spec: StageSpec, rpc_timeout_s: float) -> RemoteStage:
    return RemoteStage(spec, rpc_timeout_s, metrics_port=_METRICS_PORT)


class RpcPipeline(Pipeline):
    """Micro-batches enter worker0; the last worker sends their token ids back here (``results.deliver``)."""

    def __init__(
        self, stages: list[rpc.RRef], names: list[str], num_blocks: int, block_size: int, timeout: float
    ) -> None:
        super().__init__(names, num_blocks, block_size)
        self.stages = stages
        self.timeout = timeout

    def _submit(self, mb: MicroBatch) -> concurrent.futures.Future:
        result = results.expect(mb.id)
        first = self.stages[0]
        names = self.stage_names
        try:
            chain = rpc.rpc_async(
                first.owner(), RemoteStage.forward,
                args=(first, mb.id, mb.token_ids, mb.batch.to_payload(), mb.sampling), timeout=self.timeout,
            )
        except Exception as e:
            results.fail(mb.id, StageError(f"{names[0]} is unreachable: {e}"))
            return result

        def done(f) -> None:  # the chain completes after the tokens arrived, or with the failing stage's error
            try:
                results.raise_failure(f, names[0])
            except StageError as e:
                results.fail(mb.id, e)
            else:
                results.fail(
                    mb.id, StageError(f"{names[-1]} finished micro-batch {mb.id}, but its tokens never arrived"))

        chain.add_done_callback(done)
        return result

    def describe(self, timeout: float = 5.0) -> list[StageReport]:
        futures = [stage.rpc_async(timeout=timeout).describe() for stage in self.stages]
        out = []
        for k, (name, f) in enumerate(zip(self.stage_names, futures)):
            try:
                out.append(f.wait())
            except Exception as e:
                out.append(StageReport.down(name, k, str(e).splitlines()[0][:300]))
        return out

    def take_timings(self) -> dict[str, list[StageTiming]]:
        futures = [stage.rpc_async(timeout=self.timeout).take_timings() for stage in self.stages]
        return {name: [StageTiming(*t) for t in f.wait()] for name, f in zip(self.stage_names, futures)}

    def inject_failure(self, stage: int, message: str = "injected") -> None:
        self.stages[stage].rpc_sync().fail_next(message)


class RpcCluster:
    """The coordinator's view of the ranks; ``start`` returns once every stage has loaded."""

    def __init__(self, cfg: ChatLoopConfig, processes: list[multiprocessing.Process]) -> None:
        self.cfg = cfg
        self.processes = processes
        self.pipeline: RpcPipeline | None = None
        self._shut = False

    @classmethod
    def start(cls, cfg: ChatLoopConfig, partitions_dir: str, prepare=None) -> RpcCluster:
        """Join (torchrun) or spawn the workers, init RPC, run ``prepare()`` (e.g. the split), load the stages."""
        global _STARTED
        if _STARTED:
            # torch numbers a process's init_rpc calls in private state that a new group of
            # workers does not share; a second group in one process hangs or fails.
            raise StartupError(
                "this process already ran a ChatLoop cluster: torch.distributed.rpc starts once per process, "
                "so start the next cluster in a new process (or use cluster.in_process=true)"
            )
        _STARTED = True
        num_workers = cfg.cluster.num_workers
        world_size = num_workers + 1
        processes: list[multiprocessing.Process] = []
        manifest = None
        if under_torchrun():
            if int(os.environ["WORLD_SIZE"]) != world_size:
                raise StartupError(
                    f"torchrun started {os.environ['WORLD_SIZE']} ranks, cluster.num_workers={num_workers} needs "
                    f"{world_size} (1 coordinator + {num_workers} workers): "
                    f"use --nproc-per-node {world_size} or change num_workers"
                )
        else:
            # On one machine nobody waits in the rendezvous yet: check (and split) before spawning,
            # so that a bad configuration fails in a second. Under torchrun the other ranks are
            # waiting, so that happens after init_rpc, where a slow split cannot time them out.
            manifest = prepare() if prepare else None
            os.environ.update(MASTER_ADDR=cfg.cluster.master_addr, MASTER_PORT=str(cfg.cluster.master_port))
            processes = _spawn_workers(cfg, world_size)
        cluster = cls(cfg, processes)
        try:
            rpc.init_rpc(results.COORDINATOR, rank=0, world_size=world_size,
                         rpc_backend_options=_backend_options(cfg, cfg.cluster.startup_timeout_s))
        except Exception as e:
            cluster._stop_processes()
            raise StartupError(
                f"RPC rendezvous on {cfg.cluster.master_addr}:{cfg.cluster.master_port} failed: {e}") from e
        try:
            if manifest is None and prepare:
                manifest = prepare()
            cluster._load_stages(partitions_dir)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def _load_stages(self, partitions_dir: str) -> None:
        cfg = self.cfg
        specs = stage_specs(cfg, partitions_dir)
        names = [spec.name for spec in specs]
        stages = [
            rpc.remote(spec.name, _create_stage, args=(spec, cfg.cluster.rpc_timeout_s),
                       timeout=cfg.cluster.startup_timeout_s)
            for spec in specs
        ]
        reports: list[StageReport] = []
        for name, stage in zip(names, stages):
            try:
                reports.append(stage.rpc_sync(timeout=cfg.cluster.startup_timeout_s).describe())
            except Exception as e:
                raise StartupError(f"{name} could not load its stage: {_first_line(e)}") from None
        for k, stage in enumerate(stages):
            nxt = stages[k + 1] if k + 1 < len(stages) else None
            stage.rpc_sync().connect(nxt, names[k + 1] if nxt else "")
        self.stage_reports = reports
        num_blocks = min(r.num_blocks for r in reports)
        self.pipeline = RpcPipeline(stages, names, num_blocks, cfg.cache.block_size, cfg.cluster.rpc_timeout_s)
        for r in reports:
            log.info("%s: layers %s, %d KV blocks, pid %s, cores %s, %s threads, CPU capability %s",
                     r.name, r.layers, r.num_blocks, r.pid, list(r.cores or ()), r.threads, r.simd)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every rank within ``timeout`` seconds; kill the spawned workers that do not stop."""
        if self._shut:
            return
        self._shut = True
        self.pipeline = None
        done = threading.Event()

        def graceful() -> None:
            try:
                rpc.shutdown(graceful=True)
            except Exception as e:  # a dead worker makes the graceful barrier fail
                log.warning("graceful RPC shutdown failed: %s", _first_line(e))
                try:
                    rpc.shutdown(graceful=False)
                except Exception:
                    pass
            done.set()

        threading.Thread(target=graceful, daemon=True, name="chatloop-rpc-shutdown").start()
        if not done.wait(timeout):
            log.warning("RPC shutdown did not finish in %.0f s: stopping the workers", timeout)
        self._stop_processes()

    def _stop_processes(self) -> None:
        deadline = time.monotonic() + 5
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(1)


def _spawn_workers(cfg: ChatLoopConfig, world_size: int) -> list[multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    env = worker_environment(cfg.worker)  # read when the child imports torch: set it around the spawn
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        processes = []
        for rank in range(1, world_size):
            p = ctx.Process(target=run_worker, args=(rank, world_size, cfg, os.getpid()),
                            name=f"chatloop-worker{rank - 1}", daemon=True)
            p.start()
            processes.append(p)
        return processes
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    # RPC wraps a remote exception's traceback; its last line holds the message.
    useful = [line for line in lines if "Error" in line and ":" in line]
    return (useful[-1] if useful else lines[-1] if lines else repr(e)).strip()
