"""A worker process's CPU settings: intra-op threads, core pinning, SIMD capability."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.pipeline import StageReport

__all__ = ["cores_for_worker", "apply_worker_settings", "stages_at_once", "worker_environment", "SIMD_ENV"]

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

    ``workers`` are the stages' reports (``host``, ``cores``, ``threads``): workers of one host
    whose cores are too few for all their threads take turns.
    """
    by_host: dict[str, list[StageReport]] = defaultdict(list)
    for worker in workers:
        by_host[worker.host or ""].append(worker)
    total = 0
    for group in by_host.values():
        cores = set().union(*(worker.cores or () for worker in group))
        threads = max(worker.threads or 1 for worker in group)
        total += min(len(group), max(1, len(cores) // threads))
    return total


def apply_worker_settings(index: int, num_workers: int, threads: int, pinning: bool) -> dict:
    """Pin (optionally) and set torch's threads; return what was chosen, for the log and status."""
    import torch

    available = sorted(os.sched_getaffinity(0))
    cores = available
    if pinning:
        cores = cores_for_worker(index, num_workers, threads, available)
        os.sched_setaffinity(0, cores)
    num_threads = max(1, min(threads, len(cores)))
    torch.set_num_threads(num_threads)
    chosen = {
        "cores": cores,
        "threads": num_threads,
        "simd": torch.backends.cpu.get_cpu_capability(),
        "omp_spin_count": os.environ.get(SPIN_ENV),  # what libgomp read when torch loaded it
    }
    if num_threads < threads:
        log.info("worker %d: worker_threads=%d capped at its %d cores", index, threads, len(cores))
    log.info("worker %d: cores %s, %d threads, CPU capability %s", index, cores, num_threads, chosen["simd"])
    return chosen
