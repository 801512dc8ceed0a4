"""Where the last stage's answers land on the coordinator.

The last stage sends a micro-batch's sampled token ids straight to the coordinator
(``rpc_async(COORDINATOR, deliver, ...)``) instead of back through every stage: a step then
costs one hop per stage plus one, not two per stage. The chain of ``forward`` calls still
completes backwards, carrying only success or the first stage's error, so failures keep
their path and their names; the coordinator resolves each micro-batch on whichever arrives first.
"""

from __future__ import annotations

import concurrent.futures
import threading

from ..engine.errors import StageError

__all__ = ["COORDINATOR", "expect", "deliver", "fail", "fail_all", "raise_failure"]

COORDINATOR = "coordinator"
"""The coordinator's RPC name (rank 0)."""

_pending: dict[int, concurrent.futures.Future] = {}
_lock = threading.Lock()


def raise_failure(forward_future, callee: str) -> None:
    """Wait for a ``forward`` call to stage ``callee``; raise its failure as a :class:`StageError` naming a stage.

    The exception a stage sets on its ``async_execution`` future reaches the caller as the
    future's value, not raised by ``wait()``: both count as a failure. A stage's own
    ``StageError`` names it already; any other error (the transport's: a dead or unreachable
    stage, a timeout) is named after ``callee`` unless its text names it.
    """
    try:
        error = forward_future.wait()
    except Exception as e:
        error = e
    if not isinstance(error, BaseException):
        return
    if isinstance(error, StageError):
        raise error
    text = str(error)
    raise StageError(text if callee in text else f"{callee}: {text}")


def expect(mb_id: int) -> concurrent.futures.Future:
    """A future for micro-batch ``mb_id``'s token ids (coordinator side)."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    with _lock:
        assert mb_id not in _pending, f"micro-batch {mb_id} is already in flight"
        _pending[mb_id] = future
    return future


def _take(mb_id: int) -> concurrent.futures.Future | None:
    with _lock:
        return _pending.pop(mb_id, None)


def deliver(mb_id: int, token_ids: list[int]) -> None:
    """Runs on the coordinator, called by the last stage: micro-batch ``mb_id`` is done."""
    future = _take(mb_id)
    if future is not None:
        future.set_result(token_ids)


def fail_all(error: BaseException) -> None:
    """Every micro-batch in flight failed (the pipeline was lost)."""
    with _lock:
        pending = list(_pending.values())
        _pending.clear()
    for future in pending:
        if not future.done():
            future.set_exception(error)


def fail(mb_id: int, error: BaseException) -> None:
    """Micro-batch ``mb_id`` failed (or its chain finished without delivering); no-op once resolved."""
    future = _take(mb_id)
    if future is not None:
        future.set_exception(error)
