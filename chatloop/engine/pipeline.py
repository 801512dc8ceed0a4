"""What travels through the pipeline, what a stage does with it, and the in-process pipeline.

The scheduler talks to any ``Pipeline``: ``LocalPipeline`` here runs every stage in this
process (the one-process baseline and the unit tests); ``chatloop.runtime`` chains the
stages over torch.distributed.rpc.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models import Stage, StepBatch
from .sampling import SamplerInput, sample

__all__ = ["MicroBatch", "StageRunner", "Pipeline", "LocalPipeline", "StageError"]


class StageError(RuntimeError):
    """A stage failed on a micro-batch; the message names the stage."""


@dataclass
class MicroBatch:
    """One step of a few sequences: their new token ids, positions and blocks, and how to sample."""

    id: int
    token_ids: torch.Tensor  # [B, T] int64, padded with 0
    batch: StepBatch
    sampling: list[SamplerInput]


@dataclass
class StageTiming:
    """Timestamps a stage records per micro-batch (for metrics and the pipeline timeline)."""

    micro_batch: int
    start: float
    end: float


@dataclass
class StageRunner:
    """One stage with its KV pool: runs a micro-batch's share of the model.

    Returns hidden states for the next stage, or, on the last stage, the sampled token ids.
    """

    stage: Stage
    num_blocks: int
    block_size: int
    name: str = "stage"
    timings: list[StageTiming] = field(default_factory=list)
    max_timings: int = 10_000

    def __post_init__(self) -> None:
        self.cache = self.stage.new_cache(self.num_blocks, self.block_size)
        self.busy_seconds = 0.0
        self.num_micro_batches = 0

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, batch: StepBatch, sampling: list[SamplerInput], micro_batch: int = -1):
        start = time.perf_counter()
        try:
            out = self.stage(inputs, batch, self.cache)
            result = sample(out, sampling) if self.stage.is_last else out
        except Exception as e:
            raise StageError(f"{self.name} (layers {self.stage.layers_range}) failed: {type(e).__name__}: {e}") from e
        end = time.perf_counter()
        self.busy_seconds += end - start
        self.num_micro_batches += 1
        if len(self.timings) < self.max_timings:
            self.timings.append(StageTiming(micro_batch, start, end))
        return result


class Pipeline(Protocol):
    """Runs micro-batches through all stages; each future resolves to one token id per sequence."""

    num_stages: int
    num_blocks: int
    block_size: int

    def submit(self, micro_batch: MicroBatch) -> Future: ...

    def close(self) -> None: ...


def compute_thread(name: str) -> ThreadPoolExecutor:
    """The one thread that loads and runs a process's stages.

    libgomp keeps an OpenMP thread pool per thread that starts parallel regions and stops
    spinning between regions once the pools together outnumber the cores: with a second
    pool alive (say, the thread that loaded the weights) a 2-thread decode step ran 1.5x
    slower on the 2-core host. So everything multi-threaded in torch happens on this thread.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chatloop-{name}")


class LocalPipeline:
    """All stages in this process, one after another, one micro-batch at a time."""

    def __init__(self, runners: list[StageRunner], executor: ThreadPoolExecutor | None = None) -> None:
        self.runners = runners
        self.num_stages = len(runners)
        self.num_blocks = min(r.num_blocks for r in runners)
        self.block_size = runners[0].block_size
        self._executor = executor or compute_thread("local")  # the thread that loaded the stages, if given
        self._lock = threading.Lock()

    def submit(self, micro_batch: MicroBatch) -> Future:
        return self._executor.submit(self._run, micro_batch)

    def _run(self, mb: MicroBatch) -> list[int]:
        x = mb.token_ids
        for runner in self.runners:
            x = runner.run(x, mb.batch, mb.sampling, mb.id)
        return x

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
