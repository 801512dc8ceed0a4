"""The coordinator's engine: sampling, KV block allocation, the scheduler, the in-process pipeline.

Nothing here imports torch.distributed.rpc: the transport plugs in as a ``Pipeline``.
"""

from .blocks import BlockAllocator
from .pipeline import LocalPipeline, MicroBatch, Pipeline, StageError, StageRunner
from .sampling import SamplerInput, SamplingParams, sample
from .scheduler import QueueFullError, Scheduler, SequenceEvent

__all__ = [
    "BlockAllocator", "LocalPipeline", "MicroBatch", "Pipeline", "QueueFullError", "SamplerInput",
    "SamplingParams", "Scheduler", "SequenceEvent", "StageError", "StageRunner", "sample",
]
