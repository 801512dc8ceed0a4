"""The coordinator's faults as records: why a worker's stage is lost, why a generation could not form.

A reason is made once, where the loss is seen (an exit, a heartbeat, a step nobody answered), already naming the
stage; healing never reads it back (no splitting on words), it only prints it. The faults of micro-batches
(:class:`~chatloop.engine.StageError` and its :class:`~chatloop.engine.FaultKind`) live in the engine, which
decides on them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .members import label

__all__ = ["GenerationError", "Loss", "summary"]


@dataclass(frozen=True)
class Loss:
    """One stage's loss: ``reason``, one line that names the stage ('worker2 (pid 9) was killed by SIGKILL'), and
    ``output``, the last lines its process wrote, where there are any."""

    reason: str
    output: str = ""

    @classmethod
    def of(cls, index: int, info: Mapping[str, Any] | None, why: str) -> Loss:
        """``why`` (which does not name the stage) about worker ``index``, labelled with what it announced."""
        return cls(f"{label(index, info)}: {why}")

    def during(self, when: str) -> Loss:
        """'worker1 (pid 9) exited with code 3 ``when``'."""
        return replace(self, reason=f"{self.reason} {when}")

    def hinted(self, hint: str) -> Loss:
        """The reason, then what to do about it."""
        return replace(self, reason=f"{self.reason}; {hint}")

    def __str__(self) -> str:
        return self.reason + (f"; its last output:\n{self.output}" if self.output else "")


def summary(losses: Mapping[int, Loss]) -> str:
    """Each loss's one line, in stage order ('worker2 (pid 9) was killed by SIGKILL; ...'), a line shared by several
    stages once."""
    return "; ".join(dict.fromkeys(loss.reason for _, loss in sorted(losses.items())))


class GenerationError(RuntimeError):
    """A generation could not form or load: which workers held it up, and why (each one's own reason in
    ``reasons``, where they differ); ``named``: the reasons name their stages (else they are about all of them)."""

    def __init__(self, indices: list[int], message: str, reasons: dict[int, str] | None = None,
                 named: bool = False) -> None:
        super().__init__(message)
        self.indices = indices
        self.reasons = dict(reasons or {})
        self.named = named

    def reason(self, index: int) -> str:
        return self.reasons.get(index, str(self))

    def loss(self, index: int, info: Mapping[str, Any] | None) -> Loss:
        """Worker ``index``'s reason as a :class:`Loss`, named with what it announced (``info``) where it is not."""
        return Loss(self.reason(index)) if self.named else Loss.of(index, info, self.reason(index))
