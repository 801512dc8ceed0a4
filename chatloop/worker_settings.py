"""A worker process's CPU settings: intra-op threads, core pinning, SIMD capability; which machine it runs on."""

from __future__ import annotations

import logging
import math
import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.pipeline import StageReport

__all__ = [
    "cores_for_worker", "apply_worker_settings", "cpu_quota", "machine_id", "stages_at_once", "worker_environment",
    "SIMD_ENV",
]

log = logging.getLogger(__name__)
SIMD_ENV = "ATEN_CPU_CAPABILITY"
SPIN_ENV = "GOMP_SPINCOUNT"


def worker_environment(worker) -> dict[str, str]:
    """Environment variables a worker process needs before it imports torch (``worker``: WorkerConfig).

    torch reads its CPU capability, and libgomp its spin count, once, when they are loaded.
    """
    env = {}
    if not worker.enable_simd:
        env[SIMD_ENV] = "default"
    if worker.omp_spin_count is not None:
        env[SPIN_ENV] = str(worker.omp_spin_count)
    return env


def machine_id() -> str:
    """The running kernel's boot id: the same in every container and network namespace of one machine.

    Workers in containers each have a hostname of their own; grouping them by hostname took five containers on a
    2-core host for five machines, kept four micro-batches in flight, and four stages of two OpenMP threads each
    fought over the two cores (11 tokens/s instead of 128).
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def _quota_in(folder: Path) -> float | None:
    """One cgroup folder's CPU quota in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None: unlimited or none."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU time this process may use, in cores, from its cgroup's quota and its parents' (``docker run
    --cpus``, a Kubernetes limit, ``cpu.cfs_quota_us``); None when none applies. Affinity shows cores, not quotas.

    ``root``: where the cgroup file systems are mounted; ``membership``: the process's cgroups (v1 and v2).
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    folders: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and "cpu" not in controllers.split(","):
            continue
        mount = root if not controllers else next((m for m in (root / controllers, root / "cpu") if m.is_dir()), None)
        if mount is None:
            continue
        own = mount / path.strip("/")
        # Inside a container the mount is often the container's own cgroup, and the path (the host's) is not there.
        chain = [own, *own.parents] if own.is_dir() else [mount]
        folders += [f for f in chain if f == mount or mount in f.parents]
    limits = [q for q in map(_quota_in, folders) if q is not None]
    return min(limits) if limits else None


def cores_for_worker(index: int, num_workers: int, threads: int, available: list[int]) -> list[int]:
    """The cores worker ``index`` is pinned to.

    With enough cores each worker gets ``threads`` cores of its own, and all stages can
    compute at once. Otherwise every worker gets all of them and the workers take turns (see
    :func:`stages_at_once`): on a 2-core host, four 1-core workers with two micro-batches in
    flight decoded SmolLM2 at 0.68 of one process's speed, four 2-thread workers taking turns
    at 0.91 (a pipeline cannot add cores; smaller micro-batches re-read every weight).
    """
    if not available:
        raise ValueError("no CPU cores are available to this process")
    if threads * num_workers > len(available):
        return list(available)
    return available[index * threads : (index + 1) * threads]


def stages_at_once(workers: Sequence[StageReport]) -> int:
    """How many stages can compute at the same moment: the micro-batches worth keeping in flight.

    ``workers`` are the stages' reports (``machine``, else ``host``; ``cores``, ``cpu_limit``, ``threads``):
    workers of one machine, in containers or not, whose cores (or CPU quotas) are too few for all their threads
    take turns.
    """
    by_machine: dict[str, list[StageReport]] = defaultdict(list)
    for worker in workers:
        by_machine[worker.machine or worker.host or ""].append(worker)
    total = 0
    for group in by_machine.values():
        cores = len(set().union(*(worker.cores or () for worker in group)))
        quotas = [worker.cpu_limit for worker in group]
        if cores and all(q is not None for q in quotas):
            cores = min(cores, math.ceil(sum(quotas)))
        threads = max(worker.threads or 1 for worker in group)
        total += min(len(group), max(1, cores // threads))
    return total


def apply_worker_settings(index: int, num_workers: int, threads: int, pinning: bool) -> dict:
    """Pin (optionally) and set torch's threads; return what was chosen, for the log and status."""
    import torch

    available = sorted(os.sched_getaffinity(0))
    quota = cpu_quota()  # a container limited to 1.5 CPUs gets 2 threads, not one per core it can see
    cores = available
    if pinning:
        cores = cores_for_worker(index, num_workers, threads, available)
        os.sched_setaffinity(0, cores)
    usable = len(cores) if quota is None else min(len(cores), max(1, math.ceil(quota)))
    num_threads = max(1, min(threads, usable))
    torch.set_num_threads(num_threads)
    chosen = {
        "cores": cores,
        "threads": num_threads,
        "simd": torch.backends.cpu.get_cpu_capability(),
        "omp_spin_count": os.environ.get(SPIN_ENV),  # what libgomp read when torch loaded it
        "machine": machine_id(),
        "cpu_limit": quota,
    }
    if num_threads < threads:
        log.info("worker %d: worker_threads=%d capped at its %d cores%s", index, threads, usable,
                 f" (CPU quota {quota:g})" if quota is not None else "")
    log.info("worker %d: cores %s, %d threads, CPU capability %s", index, cores, num_threads, chosen["simd"])
    return chosen
