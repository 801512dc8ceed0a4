"""The transport: every torch.distributed.rpc import of ChatLoop lives in this package.

``cluster``: the coordinator's side (worker processes, the store, the current generation);
``generation``: one RPC world, formed, loaded and left; ``rpc_pipeline``: the pipeline over one
generation's workers; ``healing``: the watchdog; ``rendezvous``: the store ranks meet in and one RPC
world per generation; ``worker``: a worker process; ``processes``: starting one;
``worker_host``: what a worker holds across generations and what the coordinator calls on it;
``remote_stage``: a worker's stage, computing on its own thread;
``results``: where the last stage's tokens land on the coordinator; ``worker_metrics``: each
worker's Prometheus endpoint; ``members``: what a worker tells the coordinator when it joins (its
container, or the command that starts it again), and how messages name a lost one.
"""

from .cluster import RpcCluster, StartupError
from .worker import serve_worker

__all__ = ["RpcCluster", "StartupError", "serve_worker"]
