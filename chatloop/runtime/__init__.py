"""The transport: every torch.distributed.rpc import of ChatLoop lives in this package.

``cluster``: ranks, rendezvous, the RPC pipeline and shutdown; ``remote_stage``: a worker's
stage as an RPC object; ``results``: where the last stage's tokens land on the coordinator;
``worker_metrics``: each worker's Prometheus endpoint.
"""

from .cluster import RpcCluster, StartupError, run_worker, under_torchrun

__all__ = ["RpcCluster", "StartupError", "run_worker", "under_torchrun"]
