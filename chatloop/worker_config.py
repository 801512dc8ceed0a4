"""One worker's own configuration file, as in the reference deployment (``configs/worker-config-N.yaml``).

``chatloop-split`` writes one per partition beside the partitions; ``chatloop-worker --config FILE
--coordinator HOST:50050`` starts that worker on any host from it. Every field acts:

- ``worker``, ``num_workers``: which stage this is, of how many (the RPC rank is ``worker + 1``);
- ``start_layer``, ``end_layer``, ``partition``: checked against what the coordinator asks this worker to
  load, so a file copied to the wrong host fails at once, naming both;
- ``holds``: the partition files this host holds (a shared or copied split); empty: ``partition`` alone. Under
  ``cluster.plan=auto`` the worker may be given any range these files cover (see docs/placement.md);
- ``partitions_dir``: where this host keeps the partitions (relative to the file; a container mounts them
  elsewhere than the coordinator);
- ``previous_worker``, ``next_worker``: the neighbours, checked against the chain the coordinator builds;
- ``port``: this worker's health endpoint (``GET /health``, for container health checks); its RPC ports are
  TensorPipe's choice, which torch.distributed.rpc does not let anyone fix;
- ``metrics_port``: its Prometheus endpoint;
- ``worker_threads``, ``enable_cpu_pinning``, ``enable_simd``, ``kv_cache_mb``: this worker's CPU settings and
  KV pool (the coordinator uses the smallest pool of all).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config import ChatLoopConfig

__all__ = ["Neighbour", "WorkerFile", "load_worker_file", "worker_files"]

CONFIG_DIR = "configs"
REFERENCE_PORT = 50051
"""Worker k's health port in the reference layout: 50051 + k."""
REFERENCE_METRICS_PORT = 9091


@dataclass(frozen=True)
class Neighbour:
    name: str
    port: int


@dataclass(frozen=True, kw_only=True)
class WorkerFile:
    """The fields of ``worker-config-N.yaml`` (see the module's docstring)."""

    worker: int
    num_workers: int
    name: str
    port: int
    metrics_port: int
    start_layer: int
    end_layer: int
    partition: str
    partitions_dir: str
    previous_worker: Neighbour | None = None
    next_worker: Neighbour | None = None
    worker_threads: int = 8
    enable_cpu_pinning: bool = True
    enable_simd: bool = True
    kv_cache_mb: float = 512
    holds: list[str] = field(default_factory=list)
    """The partition files in ``partitions_dir`` this host holds; empty: only ``partition``."""
    source: str = ""
    """The file this was read from (for messages)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.worker < self.num_workers:
            problems.append(f"worker: {self.worker} is not in 0..{self.num_workers - 1} (num_workers)")
        if not 0 <= self.start_layer <= self.end_layer:
            problems.append(f"layers {self.start_layer}-{self.end_layer} are empty or negative")
        for name in ("port", "metrics_port"):
            if not 0 < getattr(self, name) < 65536:
                problems.append(f"{name}: {getattr(self, name)} is not a TCP port")
        if not isinstance(self.holds, list) or not all(isinstance(f, str) and f for f in self.holds):
            problems.append(f"holds: {self.holds!r} must be a list of partition file names")
        if self.worker_threads < 1 or self.kv_cache_mb <= 0:
            problems.append("worker_threads must be >= 1 and kv_cache_mb > 0")
        if problems:
            raise ValueError(f"{self.source or 'worker config'}: " + "; ".join(problems))

    @property
    def held_files(self) -> list[str]:
        """The partition files this host holds: ``holds``, or its own ``partition`` alone."""
        return list(self.holds) or [self.partition]

    def as_yaml(self) -> str:
        data = asdict(self)
        data.pop("source")
        header = (
            f"# {self.name}: stage {self.worker} of {self.num_workers}, written by chatloop-split. On its host:\n"
            f"#   chatloop-worker --config {CONFIG_DIR}/worker-config-{self.worker}.yaml --coordinator HOST:50050\n"
            "# port: its health endpoint (GET /health); its RPC ports are TensorPipe's choice (see README, Deploy).\n"
        )
        return header + yaml.safe_dump(data, sort_keys=False)

    def apply(self, cfg: ChatLoopConfig) -> None:
        """Make ``cfg`` (the worker's runtime configuration) say what this file says."""
        cfg.cluster.num_workers = self.num_workers
        cfg.worker.worker_threads = self.worker_threads
        cfg.worker.enable_cpu_pinning = self.enable_cpu_pinning
        cfg.worker.enable_simd = self.enable_simd
        cfg.worker.metrics_port = self.metrics_port - self.worker  # worker k serves on metrics_port + k
        cfg.cache.kv_cache_mb = self.kv_cache_mb


def worker_files(num_partitions: int, partitions: list[tuple[int, int, str]], **common: Any) -> list[WorkerFile]:
    """The reference layout's files for ``partitions`` [(start_layer, end_layer, file)] (``partitions_dir`` "..")."""
    names = [f"worker-{k}" for k in range(num_partitions)]
    out = []
    for k, (start, end, file) in enumerate(partitions):
        out.append(WorkerFile(
            worker=k, num_workers=num_partitions, name=names[k], port=REFERENCE_PORT + k,
            metrics_port=REFERENCE_METRICS_PORT + k, start_layer=start, end_layer=end, partition=file,
            partitions_dir="..",
            previous_worker=Neighbour(names[k - 1], REFERENCE_PORT + k - 1) if k > 0 else None,
            next_worker=Neighbour(names[k + 1], REFERENCE_PORT + k + 1) if k + 1 < num_partitions else None,
            **common,
        ))
    return out


def load_worker_file(path: str | Path) -> WorkerFile:
    """Read a worker config file; ``ValueError`` naming the file and the field for anything wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read the worker config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of fields (see chatloop-split's configs/worker-config-N.yaml)")
    known = {f.name for f in fields(WorkerFile)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(known))}")
    for side in ("previous_worker", "next_worker"):
        if isinstance(raw.get(side), dict):
            raw[side] = Neighbour(**raw[side])
    try:
        found = WorkerFile(**raw, source=str(path))
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    directory = Path(found.partitions_dir)
    if not directory.is_absolute():
        directory = (path.parent / directory).resolve()
    return WorkerFile(**{**asdict(found), "partitions_dir": str(directory), "previous_worker": found.previous_worker,
                         "next_worker": found.next_worker})
