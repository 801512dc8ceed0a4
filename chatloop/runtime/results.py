"""Where the last stage's answers and the stages' failure reports land on the coordinator.

The last stage sends a micro-batch's sampled token ids straight to the coordinator (a ``deliver`` message on its
link to the coordinator's listener) instead of back through every stage: a step costs one hop per stage plus one.
Messages on links are not answered; a stage whose compute fails, or whose link onwards breaks, says so on its own
link to the same listener (a ``failed`` message, naming itself), and the coordinator resolves the micro-batch with
it. One :class:`Results` per generation, handed to its pipeline: nothing here lives at module level.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

__all__ = ["COORDINATOR", "Results"]

COORDINATOR = "coordinator"
"""The coordinator's RPC name (rank 0)."""


class Results:
    """The micro-batches in flight, each a future resolved once (first answer wins), and who hears of failures."""

    def __init__(self) -> None:
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.on_failure: Callable[[int, BaseException], None] | None = None
        """The current pipeline's handler of a stage's failure report (see :meth:`report_failure`)."""

    def expect(self, mb_id: int) -> concurrent.futures.Future:
        """A future for micro-batch ``mb_id``'s token ids."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            assert mb_id not in self._pending, f"micro-batch {mb_id} is already in flight"
            self._pending[mb_id] = future
        return future

    def _take(self, mb_id: int) -> concurrent.futures.Future | None:
        with self._lock:
            return self._pending.pop(mb_id, None)

    def deliver(self, mb_id: int, token_ids: list[int]) -> None:
        """The last stage's answer: micro-batch ``mb_id`` is done."""
        future = self._take(mb_id)
        if future is not None:
            future.set_result(token_ids)

    def fail(self, mb_id: int, error: BaseException) -> None:
        """Micro-batch ``mb_id`` failed (or its chain finished without delivering); no-op once resolved."""
        future = self._take(mb_id)
        if future is not None:
            future.set_exception(error)

    def fail_all(self, error: BaseException) -> None:
        """Every micro-batch in flight failed (the pipeline was lost)."""
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(error)

    def report_failure(self, mb_id: int, error: BaseException) -> None:
        """A stage says micro-batch ``mb_id`` failed there (-1: the stage's link onwards closed, so whatever the next
        stage held is lost): the pipeline locates and decides; without one, the step fails as reported."""
        handler = self.on_failure
        if handler is not None:
            handler(mb_id, error)
        elif mb_id >= 0:
            self.fail(mb_id, error)

    def serve_call(self, method: str, args: tuple) -> None:
        """The coordinator's link listener: the last stage sends ``deliver``, any stage ``failed``."""
        if method == "deliver":
            self.deliver(*args)
        elif method == "failed":
            self.report_failure(*args)
        else:
            raise ValueError(f"the coordinator serves 'deliver' and 'failed' on its links, not {method!r}")
