"""The transport: every torch.distributed.rpc import of ChatLoop lives in this package.

``cluster``: the coordinator's side (worker processes, the RPC world, the RPC pipeline);
``rendezvous``: the store ranks meet in and one RPC world per generation; ``worker``: a worker
process; ``processes``: starting one; ``remote_stage``: a worker's stage as an RPC object;
``results``: where the last stage's tokens land on the coordinator; ``worker_metrics``: each
worker's Prometheus endpoint; ``members``: what a worker tells the coordinator when it joins (its
container, or the command that starts it again), and how messages name a lost one.
"""

from .cluster import RpcCluster, StartupError
from .worker import serve_worker

__all__ = ["RpcCluster", "StartupError", "serve_worker"]
