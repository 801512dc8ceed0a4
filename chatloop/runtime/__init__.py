"""The transport: every torch.distributed.rpc import of ChatLoop lives in this package."""

from .cluster import RpcCluster, StartupError, run_worker, under_torchrun

__all__ = ["RpcCluster", "StartupError", "run_worker", "under_torchrun"]
