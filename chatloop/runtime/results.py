"""Where the last stage's answers land on the coordinator, and the stages' failure reports.

The last stage sends a micro-batch's sampled token ids straight to the coordinator (a
``deliver`` message on its link to the coordinator's listener, :func:`serve_call`) instead of
back through every stage: a step costs one hop per stage plus one. Messages on links are not
answered; a stage whose compute fails, or whose link onwards breaks, says so over RPC
(:func:`report_failure`), naming itself, and the coordinator resolves the micro-batch with it.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

__all__ = ["COORDINATOR", "expect", "deliver", "fail", "fail_all", "report_failure", "serve_call"]

COORDINATOR = "coordinator"
"""The coordinator's RPC name (rank 0)."""

_pending: dict[int, concurrent.futures.Future] = {}
_lock = threading.Lock()
on_failure: Callable[[int, BaseException], None] | None = None
"""The current pipeline's handler of a stage's failure report (see :func:`report_failure`)."""


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


def serve_call(method: str, args: tuple) -> None:
    """The coordinator's link listener: the last stage sends ``deliver`` on it."""
    if method != "deliver":
        raise ValueError(f"the coordinator serves 'deliver' on its link, not {method!r}")
    deliver(*args)


def report_failure(mb_id: int, error: BaseException) -> None:
    """Runs on the coordinator, called by a stage over RPC: micro-batch ``mb_id`` failed there (-1: the stage's
    link onwards closed, so whatever the next stage held is lost)."""
    handler = on_failure
    if handler is not None:
        handler(mb_id, error)
    elif mb_id >= 0:
        fail(mb_id, error)


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
