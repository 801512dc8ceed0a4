"""A worker process's CPU settings: intra-op threads, core pinning, SIMD capability."""

from __future__ import annotations

import logging
import os

__all__ = ["cores_for_worker", "apply_worker_settings", "SIMD_ENV"]

log = logging.getLogger(__name__)
SIMD_ENV = "ATEN_CPU_CAPABILITY"


def cores_for_worker(index: int, num_workers: int, threads: int, available: list[int]) -> list[int]:
    """The cores worker ``index`` is pinned to.

    With enough cores each worker gets ``threads`` cores of its own. When cores run out the
    workers share them round-robin: each gets ``max(1, len(available) // num_workers)`` cores,
    so neighbours in the pipeline (which rarely compute at the same moment) overlap least.
    """
    if not available:
        raise ValueError("no CPU cores are available to this process")
    per_worker = threads if threads * num_workers <= len(available) else max(1, len(available) // num_workers)
    start = (index * per_worker) % len(available)
    return [available[(start + i) % len(available)] for i in range(min(per_worker, len(available)))]


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
    }
    if num_threads < threads:
        log.info("worker %d: worker_threads=%d capped at its %d cores", index, threads, len(cores))
    log.info("worker %d: cores %s, %d threads, CPU capability %s", index, cores, num_threads, chosen["simd"])
    return chosen
