"""The engine's typed errors: callers (the HTTP layer, the Python API) act on the type, not the text.

Request errors are ``ValueError`` subclasses whose message says what to change; ``param``
names the request field at fault, where one is.
"""

from __future__ import annotations

__all__ = [
    "ClusterUnavailableError", "ContextLengthError", "DeadlineExceededError", "EmptyPromptError", "EngineError",
    "QueueFullError", "RequestError", "SamplingError", "SchedulerClosedError", "StageError", "StageLostError",
]


class EngineError(RuntimeError):
    """The engine cannot take a request now (not the request's fault)."""


class QueueFullError(EngineError):
    """The request queue is full: retry later (HTTP 429)."""


class SchedulerClosedError(EngineError):
    """The scheduler is shut down: no request is taken any more (HTTP 503)."""


class DeadlineExceededError(EngineError):
    """A request did not finish within its ``timeout_s`` (for instance while the cluster recovered a worker)."""


class ClusterUnavailableError(EngineError):
    """A stage is lost and the cluster could not get it back in time: the message names it and says why."""


class RequestError(ValueError):
    """A request the engine cannot run as given; ``param`` names the field to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EmptyPromptError(RequestError):
    """The prompt has no tokens."""


class ContextLengthError(RequestError):
    """Prompt plus max_new_tokens do not fit the model's context or the KV cache."""


class SamplingError(RuntimeError):
    """One sequence's next token could not be sampled (its neighbours in the micro-batch carry on)."""


class StageError(RuntimeError):
    """A stage failed on a micro-batch, or did not answer; the message names the stage."""


class StageLostError(StageError):
    """A micro-batch was lost between stages (a worker died, stopped, or cannot be reached), not failed by one:
    with self-healing its sequences are prefilled again once the pipeline is rebuilt."""
