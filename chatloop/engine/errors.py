"""The engine's typed errors: callers (the HTTP layer, the Python API) act on the type, not the text.

Request errors are ``ValueError`` subclasses whose message says what to change; ``param``
names the request field at fault, where one is.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "ClusterUnavailableError", "ContextLengthError", "DeadlineExceededError", "EmptyPromptError", "EngineError",
    "FaultKind", "QueueFullError", "RequestError", "SamplingError", "SchedulerClosedError", "StageError",
    "StageLostError", "first_line", "stage_fault",
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


class FaultKind(str, Enum):
    """What went wrong with a micro-batch in the pipeline, decided where it was seen (never from message text)."""

    LOST = "lost"
    """A stage is gone or out of reach (or must be replaced): its sequences replay once the pipeline is rebuilt."""
    STALLED = "stalled"
    """A stage answers but has made no progress on one micro-batch for ``cluster.progress_deadline_s``: replaced
    like a lost one."""
    FAILED = "failed"
    """A stage raised on the micro-batch: its requests fail (a replay would fail again)."""
    TIMED_OUT = "timed out"
    """The step took longer than ``cluster.rpc_timeout_s`` while every stage answers: its requests fail."""


class StageError(RuntimeError):
    """A stage failed on a micro-batch, or did not answer: ``kind`` says how, ``stage`` which one (None while not
    yet located: a link closed somewhere downstream, a step past its deadline), ``generation`` in which RPC world,
    ``cause`` what was seen, without the stage's name. The message names the stage for people."""

    default_kind = FaultKind.FAILED

    def __init__(self, message: str, *, kind: FaultKind | None = None, stage: int | None = None,
                 generation: int | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind or self.default_kind
        self.stage = stage
        self.generation = generation
        self.cause = cause if cause is not None else message

    @property
    def located(self) -> bool:
        """Whether the stage at fault is known (a failure in a stage always is: it says so itself)."""
        return self.stage is not None or self.kind is FaultKind.FAILED


class StageLostError(StageError):
    """A micro-batch was lost between stages (a worker died, stopped, cannot be reached, or stalled), not failed by
    one: with self-healing its sequences are prefilled again once the pipeline is rebuilt."""

    default_kind = FaultKind.LOST


def stage_fault(kind: FaultKind, message: str, **where) -> StageError:
    """The error of a ``kind`` of fault: a :class:`StageLostError` (replayed) for lost and stalled stages, else a
    :class:`StageError` (the requests fail). ``where``: ``stage``, ``generation``, ``cause``."""
    replayed = kind in (FaultKind.LOST, FaultKind.STALLED)
    return (StageLostError if replayed else StageError)(message, kind=kind, **where)


def first_line(error: BaseException, limit: int | None = None) -> str:
    """One useful line of an error, for messages (at most ``limit`` characters): an RPC error carries the remote
    traceback, whose last ``...Error: ...`` line holds the message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    useful = [line for line in lines if "Error" in line and ":" in line]
    return (useful[-1] if len(lines) > 1 and useful else lines[0])[:limit]
