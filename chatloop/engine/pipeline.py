"""The pipeline boundary: what travels through the stages, what a stage reports, and the in-process pipeline.

The scheduler talks to any :class:`Pipeline`: :class:`LocalPipeline` here runs every stage in
this process (the one-process baseline and the unit tests); ``chatloop.runtime`` chains the
stages over torch.distributed.rpc. Everything a caller may ask of a pipeline is on the class:
its stages' names and reports, their timings, observers of each step.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch

from ..models import StepBatch
from .requests import SamplerInput

__all__ = [
    "LocalPipeline", "MicroBatch", "Pipeline", "StageReport", "StageTiming", "StepObserver", "StepRecord",
    "compute_thread", "smallest_window_pool", "stage_name",
]

log = logging.getLogger(__name__)


def stage_name(index: int, in_process: bool = False) -> str:
    """Stage ``index``'s name: ``worker{index}`` (its RPC name) in a worker process, ``stage{index}`` in process."""
    return f"stage{index}" if in_process else f"worker{index}"


@dataclass
class MicroBatch:
    """One step of a few sequences: their new token ids, positions and blocks, and how to sample."""

    id: int
    token_ids: torch.Tensor  # [B, T] int64, padded with 0
    batch: StepBatch
    sampling: list[SamplerInput]


class StageTiming(NamedTuple):
    """When a stage computed one micro-batch: wall-clock seconds (time.time())."""

    micro_batch: int
    start: float
    end: float


@dataclass(frozen=True)
class StepRecord:
    """One micro-batch as the coordinator saw it: sent, and answered (perf_counter seconds)."""

    micro_batch: int
    num_sequences: int
    num_tokens: int
    """Token columns per sequence (the prompt's length for a prefill, 1 for a decode)."""
    sent: float
    done: float
    failed: bool


StepObserver = Callable[[StepRecord], None]


@dataclass(frozen=True, kw_only=True)
class StageReport:
    """What a stage says about itself (health, status, metrics and the benchmarks read it).

    A stage that did not answer has only ``name``, ``index`` and ``error``.
    """

    name: str
    index: int
    error: str | None = None
    """Why the stage is down; None when it answered."""
    layers: str | None = None
    host: str | None = None
    machine: str | None = None
    """The kernel's boot id: stages of one machine share it, in containers and network namespaces too."""
    container: str | None = None
    """The container its worker runs in ($CHATLOOP_CONTAINER), which messages name with the command to start it."""
    pid: int | None = None
    in_process: bool = False
    """It runs inside the coordinator's process (no RPC)."""
    partition: str | None = None
    partition_bytes: int | None = None
    num_blocks: int | None = None
    num_window_blocks: int | None = None
    """Blocks of its windowed layers' own pool (a model that mixes windowed and full layers); None: one pool."""
    kv_cache_bytes: int | None = None
    rss_bytes: int | None = None
    uptime_s: float | None = None
    busy_s: float | None = None
    num_micro_batches: int | None = None
    cores: tuple[int, ...] | None = None
    threads: int | None = None
    cpu_limit: float | None = None
    """The CPU quota of the stage's cgroup, in cores (None: none)."""
    simd: str | None = None
    omp_spin_count: str | None = None
    metrics_port: int | None = None
    health_port: int | None = None
    """A worker started from its own config file serves GET /health there."""
    link_address: str | None = None
    """Where the previous stage sends this worker its micro-batches ("host:port")."""
    queued: int | None = None
    """Micro-batches waiting for this stage's compute thread."""
    computing_s: float | None = None
    """How long the micro-batch it computes now has been computing (None: idle)."""
    consecutive_failures: int | None = None
    """Micro-batches that failed here in a row (0 after a success)."""
    last_error: str | None = None
    recovering: bool = False
    """Down, and being replaced: requests wait for it rather than fail."""

    @property
    def up(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def down(cls, name: str, index: int, error: str) -> StageReport:
        return cls(name=name, index=index, error=error)


class Pipeline(ABC):
    """Runs micro-batches through all stages; each submitted future resolves to one token id per sequence."""

    def __init__(self, stage_names: list[str], num_blocks: int, block_size: int, num_window_blocks: int = 0) -> None:
        self.stage_names = list(stage_names)
        self.num_stages = len(self.stage_names)
        self.num_blocks = num_blocks
        """KV blocks every stage has (the smallest stage's pool)."""
        self.num_window_blocks = num_window_blocks
        """Blocks of the windowed layers' own pool every stage with windowed layers has (the smallest); 0: one pool,
        one block table for every layer."""
        self.block_size = block_size
        self._observers: list[StepObserver] = []

    def submit(self, micro_batch: MicroBatch) -> Future:
        """Start a micro-batch; the future resolves to its token ids or fails with a :class:`StageError`."""
        future = self._submit(micro_batch)
        if self._observers:
            sent = time.perf_counter()
            num_sequences, num_tokens = micro_batch.token_ids.shape

            def observe(f: Future) -> None:
                record = StepRecord(micro_batch.id, num_sequences, num_tokens, sent, time.perf_counter(),
                                    f.exception() is not None)
                for observer in self._observers:
                    try:
                        observer(record)
                    except Exception:  # an observer never breaks a step
                        log.exception("a step observer failed")

            future.add_done_callback(observe)
        return future

    def add_observer(self, observer: StepObserver) -> None:
        """Call ``observer(StepRecord)`` when each micro-batch submitted from now on is answered."""
        self._observers.append(observer)

    @abstractmethod
    def _submit(self, micro_batch: MicroBatch) -> Future: ...

    @abstractmethod
    def describe(self, timeout: float) -> list[StageReport]:
        """Every stage's report, within ``timeout`` seconds; a stage that does not answer is reported down."""

    @abstractmethod
    def take_timings(self) -> dict[str, list[StageTiming]]:
        """Each stage's micro-batch timings since the last call (then forgotten)."""

    def close(self) -> None:  # noqa: B027 - optional: most pipelines hold nothing to release
        """Release what the pipeline holds in this process."""


def smallest_window_pool(num_window_blocks) -> int:
    """The windowed layers' pool every stage that has one holds (stages without windowed layers have none: 0)."""
    return min((n for n in num_window_blocks if n), default=0)


def compute_thread(name: str) -> ThreadPoolExecutor:
    """The one thread that loads and runs a process's stages.

    libgomp keeps an OpenMP thread pool per thread that starts parallel regions and stops
    spinning between regions once the pools together outnumber the cores: with a second
    pool alive (say, the thread that loaded the weights) a 2-thread decode step ran 1.5x
    slower on the 2-core host. So everything multi-threaded in torch happens on this thread.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chatloop-{name}")


class LocalPipeline(Pipeline):
    """All stages in this process, one after another, one micro-batch at a time."""

    def __init__(self, runners: list, executor: ThreadPoolExecutor | None = None) -> None:
        super().__init__([r.name for r in runners], min(r.num_blocks for r in runners), runners[0].block_size,
                         smallest_window_pool(r.num_window_blocks for r in runners))
        self.runners = runners  # StageRunner
        self._executor = executor or compute_thread("local")  # the thread that loaded the stages, if given
        self._lock = threading.Lock()

    def _submit(self, micro_batch: MicroBatch) -> Future:
        return self._executor.submit(self._run, micro_batch)

    def _run(self, mb: MicroBatch) -> list[int]:
        x = mb.token_ids
        for runner in self.runners:
            x = runner.run(x, mb.batch, mb.sampling, mb.id)
        return x

    def describe(self, timeout: float) -> list[StageReport]:
        # A stage whose outputs turned non-finite reports itself down (StageRunner.health_error).
        return [replace(runner.describe(), in_process=True, error=runner.health_error) for runner in self.runners]

    def take_timings(self) -> dict[str, list[StageTiming]]:
        return {runner.name: runner.take_timings() for runner in self.runners}

    def inject_failure(self, stage: int, message: str = "injected", stall_s: float = 0.0) -> None:
        """Test hook: make ``stage`` fail its next micro-batch (:func:`~chatloop.stage.fault_injection.fail_next`)."""
        from ..stage.fault_injection import fail_next

        fail_next(self.runners[stage], message, stall_s)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
