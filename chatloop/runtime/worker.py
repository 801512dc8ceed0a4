"""A worker process: its CPU settings and metrics endpoint, then generation after generation of torch RPC.

Started by the coordinator on one host (``python -m chatloop.runtime --index K --config FILE
--coordinator HOST:PORT``) or as a torchrun rank (``run_rank``). It joins the coordinator's store,
announces itself, serves its stage over RPC while the generation lasts, and joins the next one
in the same process, keeping its loaded stage, until the service closes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import torch.distributed.rpc as rpc

from ..config import ChatLoopConfig
from ..engine.pipeline import stage_name
from ..network import rank_interfaces
from ..worker_config import WorkerFile, load_worker_file
from ..worker_settings import apply_worker_settings, worker_environment
from .members import announcement
from .rendezvous import Rendezvous, RendezvousError, init_rpc_generation, shutdown_rpc
from .supervisor import EXIT_COORDINATOR_LOST
from .worker_host import WorkerHost, serve
from .worker_metrics import METRICS_HOST_ENV, start_worker_metrics

__all__ = ["backend_options", "main", "serve_worker"]

log = logging.getLogger(__name__)


def backend_options(cfg: ChatLoopConfig, timeout_s: float) -> rpc.TensorPipeRpcBackendOptions:
    """TensorPipe's options for every rank (the init method is set per generation)."""
    return rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=cfg.cluster.num_rpc_threads, rpc_timeout=timeout_s,
        _transports=list(cfg.cluster.rpc_transports), _channels=list(cfg.cluster.rpc_channels),
    )


def serve_worker(index: int, cfg: ChatLoopConfig, rendezvous: Rendezvous, own: WorkerFile | None = None,
                 command: list[str] | None = None) -> None:
    """Worker ``index``: set up this process, then serve every generation until the service closes.

    ``own``: the worker's config file (``chatloop-worker``), which the coordinator's requests are checked
    against, and whose ``port`` serves ``GET /health``. ``command``: how a person starts this worker again
    (``chatloop-worker``'s command line), told to the coordinator with its container (``$CHATLOOP_CONTAINER``),
    so that its messages about a lost worker say how to bring it back (:mod:`~chatloop.runtime.members`).
    """
    apply_worker_settings(index, cfg.cluster.num_workers, cfg.worker.worker_threads, cfg.worker.enable_cpu_pinning)
    host = WorkerHost(own)
    serve(host)  # what the coordinator's RPC calls reach in this process
    port = cfg.worker.metrics_port + index
    host.metrics_port = port if start_worker_metrics(index, port, host) is not None else None
    name, world_size = stage_name(index), cfg.cluster.num_workers + 1
    if own is not None:
        host.health_port = start_health_endpoint(name, own.port, host)
    generation = -1
    while True:
        host.activity.update(state="joining", generation=None)
        found = rendezvous.next_generation(after=generation, timeout_s=cfg.cluster.startup_timeout_s)
        if found is None:
            break
        generation = found
        rendezvous.announce(generation, index, announcement(command))
        if not rendezvous.wait_start(generation):
            continue
        init_rpc_generation(name, index + 1, world_size, generation, rendezvous,
                            backend_options(cfg, cfg.cluster.startup_timeout_s))
        host.activity.update(state="serving", generation=generation)
        log.info("%s: serving generation %d", name, generation)
        closed = rendezvous.wait_end(generation)
        host.activity.update(state="leaving")
        left = time.monotonic()
        host.release()
        if not shutdown_rpc(graceful=closed and _closes_gracefully(rendezvous), timeout_s=30):
            # Its agent is stuck: a new one could be torn down by the old shutdown. A fresh process joins instead.
            log.error("%s: leaving generation %d hung: exiting to be started again", name, generation)
            raise RendezvousError(f"{name} could not leave generation {generation}")
        log.info("%s: left generation %d in %.2f s", name, generation, time.monotonic() - left)
        if closed:
            break
    log.info("%s: the coordinator closed the service", name)


def _closes_gracefully(rendezvous: Rendezvous) -> bool:
    try:
        return rendezvous.closes_gracefully()
    except (RuntimeError, OSError):  # the coordinator and its store are gone already
        return False


def start_health_endpoint(name: str, port: int, worker: WorkerHost) -> int | None:
    """``GET /health`` on ``port``: 200 while ``worker`` serves a generation with its stage loaded, else 503.

    Binds ``$CHATLOOP_METRICS_HOST`` (127.0.0.1 by default: a container's health check runs inside it).
    """
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                self.send_error(404, "only GET /health here")
                return
            stage, activity = worker.stage, dict(worker.activity)
            unhealthy = stage.runner.unhealthy if stage is not None else None  # its outputs turned non-finite
            serving = activity["state"] == "serving" and stage is not None and unhealthy is None
            body = json.dumps({"name": name, "pid": os.getpid(), **activity, "stage_loaded": stage is not None,
                               "unhealthy": unhealthy}).encode()
            self.send_response(200 if serving else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # health checks every few seconds: not worth a log line each
            pass

    host = os.environ.get(METRICS_HOST_ENV, "127.0.0.1")
    try:
        server = ThreadingHTTPServer((host, port), Health)
    except OSError as e:
        log.warning("%s: no health endpoint on %s:%d (%s): change port in its worker config", name, host, port, e)
        return None
    threading.Thread(target=server.serve_forever, name="chatloop-health", daemon=True).start()
    log.info("%s: health on http://%s:%d/health", name, host, port)
    return port


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
    code = _run(args)
    if argv is None:  # a process of its own (python -m chatloop.runtime): nothing is left to tidy up
        _exit_now(code)
    return code


def _run(args: argparse.Namespace) -> int:
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
        print(f"{stage_name(args.index)}: lost the coordinator at {args.coordinator}: {e}", file=sys.stderr)
        return EXIT_COORDINATOR_LOST
    return 0


def _exit_now(code: int) -> NoReturn:
    """End this worker process now, with ``code``, its log written out.

    Nothing is left to save once the service closed (or SIGTERM came): the interpreter's own exit would first
    collect every object of torch and the model, 1-3 s per worker on 2 cores (py-spy: ``gc_collect_main`` in
    ``Py_FinalizeEx``), which made the whole group outlive a SIGTERM to the coordinator by seconds.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to write
            pass
    os._exit(code)


def _stop_on_sigterm(name: str) -> None:
    """SIGTERM (``docker stop``, ``podman stop``, systemd, ``kill``) ends this worker at once with status 143.

    Needed in a container, where the worker is PID 1: the kernel ignores a signal PID 1 has no handler for,
    so ``docker stop`` waited its 10 s and then SIGKILLed it. The coordinator replaces the stage (or says
    how to bring this worker back) as for any lost worker.
    """
    def stop(signum: int, _frame) -> None:
        log.warning("%s: stopped by %s: leaving", name, signal.Signals(signum).name)
        _exit_now(128 + signum)

    signal.signal(signal.SIGTERM, stop)




def _reexec_with(env: dict[str, str]) -> None:
    """Start this command again (same pid) with ``env`` set, unless it is set already.

    torch loaded libgomp with this module, and libgomp reads GOMP_SPINCOUNT only then: without this a worker
    started by itself (``chatloop-worker``, as in containers) spun idle OpenMP threads ~7 ms after every step on
    cores the other stages needed.
    """
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    code = "import sys; from chatloop.runtime.worker import cli_main; sys.exit(cli_main())"
    os.execve(sys.executable, [sys.executable, "-c", code, *sys.argv[1:]], {**os.environ, **env})


def cli_main(argv: list[str] | None = None) -> int:
    """``chatloop-worker --config configs/worker-config-2.yaml --coordinator HOST:50050``: one worker, any host.

    Joins the coordinator (``chatloop-serve cluster.launch=external``), retrying until it is up, serves its
    stage, and rejoins after the coordinator rebuilds the pipeline. Exits 75 when it loses the coordinator,
    so that a supervisor (Docker's restart policy, systemd) starts it again.
    """
    parser = argparse.ArgumentParser(prog="chatloop-worker", description=cli_main.__doc__)
    parser.add_argument("--config", required=True,
                        help="this worker's file (chatloop-split writes configs/worker-config-N.yaml)")
    parser.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator (its cluster.master_port)")
    parser.add_argument("--partitions-dir", help="where this host keeps the partitions (default: the file's "
                                                  "partitions_dir, relative to the file)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        own = load_worker_file(args.config)
        if args.partitions_dir:
            own = dataclasses.replace(own, partitions_dir=str(Path(args.partitions_dir).resolve()))
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator {args.coordinator!r}: give HOST:PORT, e.g. coordinator:50050")
        from ..config import load_config

        cfg = load_config([f"log_level={args.log_level}"])
    except ValueError as e:
        print(f"chatloop-worker: error: {e}", file=sys.stderr)
        return 2
    own.apply(cfg)
    if argv is None:  # a command line, not a call from Python
        _reexec_with(worker_environment(cfg.worker))
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s {own.name} %(levelname)s %(message)s")
    os.environ.update(rank_interfaces(host, dict(os.environ)))
    if argv is None:
        _stop_on_sigterm(own.name)
    command = ["chatloop-worker", "--config", str(Path(args.config).resolve()), "--coordinator", args.coordinator]
    if args.partitions_dir:
        command += ["--partitions-dir", own.partitions_dir]
    try:
        rendezvous = Rendezvous.join(host, int(port), cfg.cluster.startup_timeout_s)
        serve_worker(own.worker, cfg, rendezvous, own, command=command)
        code = 0
    except (RendezvousError, RuntimeError, OSError) as e:
        print(f"chatloop-worker: {own.name} lost the coordinator at {args.coordinator}: {e}", file=sys.stderr)
        code = EXIT_COORDINATOR_LOST
    if argv is None:  # a process of its own: nothing is left to tidy up
        _exit_now(code)
    return code
