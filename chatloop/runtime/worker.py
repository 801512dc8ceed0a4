"""A worker process: its CPU settings and metrics endpoint, then generation after generation of torch RPC.

Started by the coordinator on one host (``python -m chatloop.runtime --index K --config FILE
--coordinator HOST:PORT``) or as a torchrun rank (``run_rank``). It joins the coordinator's store,
announces itself, serves its stage over RPC while the generation lasts, and joins the next one
in the same process, keeping its loaded stage, until the service closes.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time

import torch.distributed.rpc as rpc

from ..config import ChatLoopConfig
from ..network import rank_interfaces
from ..worker_settings import apply_worker_settings
from . import remote_stage
from .rendezvous import Rendezvous, RendezvousError, init_rpc_generation, shutdown_rpc
from .supervisor import EXIT_COORDINATOR_LOST
from .worker_metrics import start_worker_metrics

__all__ = ["backend_options", "main", "serve_worker"]

log = logging.getLogger(__name__)


def backend_options(cfg: ChatLoopConfig, timeout_s: float) -> rpc.TensorPipeRpcBackendOptions:
    """TensorPipe's options for every rank (the init method is set per generation)."""
    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=cfg.cluster.num_rpc_threads, rpc_timeout=timeout_s,
        _transports=list(cfg.cluster.rpc_transports), _channels=list(cfg.cluster.rpc_channels),
    )


def serve_worker(index: int, cfg: ChatLoopConfig, rendezvous: Rendezvous) -> None:
    """Worker ``index``: set up this process, then serve every generation until the service closes."""
    apply_worker_settings(index, cfg.cluster.num_workers, cfg.worker.worker_threads, cfg.worker.enable_cpu_pinning)
    port = cfg.worker.metrics_port + index
    remote_stage.METRICS_PORT = port if start_worker_metrics(index, port) is not None else None
    name, world_size = f"worker{index}", cfg.cluster.num_workers + 1
    generation = -1
    while True:
        found = rendezvous.next_generation(after=generation, timeout_s=cfg.cluster.startup_timeout_s)
        if found is None:
            break
        generation = found
        rendezvous.announce(generation, index, {"pid": os.getpid(), "host": socket.gethostname()})
        if not rendezvous.wait_start(generation):
            continue
        init_rpc_generation(name, index + 1, world_size, generation, rendezvous,
                            backend_options(cfg, cfg.cluster.startup_timeout_s))
        log.info("%s: serving generation %d", name, generation)
        closed = rendezvous.wait_end(generation)
        left = time.monotonic()
        remote_stage.release()
        if not shutdown_rpc(graceful=closed, timeout_s=30):
            # Its agent is stuck: a new one could be torn down by the old shutdown. A fresh process joins instead.
            log.error("%s: leaving generation %d hung: exiting to be started again", name, generation)
            raise RendezvousError(f"{name} could not leave generation {generation}")
        log.info("%s: left generation %d in %.2f s", name, generation, time.monotonic() - left)
        if closed:
            break
    log.info("%s: the coordinator closed the service", name)


def _watch_parent(parent_pid: int) -> None:
    # A worker the coordinator started must not outlive it (kill -9, crash): poll and leave.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatloop.runtime", description=__doc__)
    parser.add_argument("--index", type=int, required=True, help="which worker (stage) this is, from 0")
    parser.add_argument("--config", required=True, help="the coordinator's configuration (a pickle it wrote)")
    parser.add_argument("--coordinator", required=True,
                        help="HOST:PORT of the coordinator's store, or 'torchrun' for torchrun's (MASTER_ADDR/PORT)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the coordinator) is gone")
    args = parser.parse_args(argv)
    with open(args.config, "rb") as f:
        cfg: ChatLoopConfig = pickle.load(f)
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s worker{args.index} %(levelname)s %(message)s")
    if args.parent_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    if args.coordinator == "torchrun":
        host = os.environ["MASTER_ADDR"]
    else:
        host, _, port = args.coordinator.rpartition(":")
    os.environ.update(rank_interfaces(host, dict(os.environ)))
    try:
        timeout = cfg.cluster.startup_timeout_s
        rendezvous = (Rendezvous.torchrun(timeout) if args.coordinator == "torchrun"
                      else Rendezvous.join(host, int(port), timeout))
        serve_worker(args.index, cfg, rendezvous)
    except (RendezvousError, RuntimeError, OSError) as e:  # no coordinator (yet, or any more): its supervisor retries
        print(f"worker{args.index}: lost the coordinator at {args.coordinator}: {e}", file=sys.stderr)
        return EXIT_COORDINATOR_LOST
    return 0


