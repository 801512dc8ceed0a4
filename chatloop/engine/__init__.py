"""The coordinator's engine: requests, the scheduling policy and its driver, KV block allocation,
the pipeline boundary, sampling, the faults it decides on. A stage at work is :mod:`chatloop.stage`.

Nothing here imports torch.distributed.rpc: the transport plugs in as a :class:`Pipeline`.
Serving talks to the engine through :class:`EngineClient` only.
"""

from .blocks import BlockAllocator
from .client import EngineClient, EngineStats
from .errors import (
    ClusterUnavailableError,
    ContextLengthError,
    DeadlineExceededError,
    EmptyPromptError,
    EngineError,
    FaultKind,
    QueueFullError,
    RequestError,
    SamplingError,
    SchedulerClosedError,
    StageError,
    StageLostError,
    first_line,
    stage_fault,
)
from .pipeline import LocalPipeline, MicroBatch, Pipeline, StageReport, StageTiming, StepRecord
from .policy import SchedulerPolicy, Step
from .requests import FinishReason, SampledToken, SamplerInput, SamplingParams, ScoredToken, SequenceEvent
from .sampling import sample
from .scheduler import Scheduler
from .scoring import sample_and_score

__all__ = [
    "BlockAllocator", "ClusterUnavailableError", "ContextLengthError", "DeadlineExceededError", "EmptyPromptError",
    "EngineClient", "EngineError", "EngineStats", "FaultKind", "FinishReason", "LocalPipeline", "MicroBatch",
    "Pipeline", "QueueFullError", "RequestError", "SampledToken", "SamplerInput", "SamplingError", "SamplingParams",
    "Scheduler", "SchedulerClosedError", "SchedulerPolicy", "ScoredToken", "SequenceEvent", "StageError",
    "StageLostError", "StageReport", "StageTiming", "Step", "StepRecord", "first_line", "sample",
    "sample_and_score", "stage_fault",
]
