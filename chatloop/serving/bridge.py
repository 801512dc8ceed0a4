"""From the scheduler's thread to the event loop: one request's events as an async stream.

The scheduler calls ``emit`` on its own thread. ``emit`` hands each event to the event loop
with ``loop.call_soon_threadsafe`` onto an ``asyncio.Queue``: no thread waits per request,
so thousands of open streams cost a queue each. ``close()`` cancels a sequence that has not
finished (a client went away), and the scheduler frees its KV blocks at its next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from ..engine import SamplingParams, SequenceEvent

__all__ = ["ClientDisconnected", "EventStream"]

Submit = Callable[[list[int], SamplingParams, Callable[[SequenceEvent], None]], Callable[[], None]]


class ClientDisconnected(Exception):
    """The HTTP client went away while its request was generating."""


class EventStream:
    """Submit one request and read its events on the event loop.

    ``submit`` is ``ChatLoop.submit`` (it raises ``QueueFullError`` or ``ValueError`` at once).
    ``on_first_token(seconds since submit)`` and ``on_inter_token(seconds since the previous
    token)`` feed the latency histograms.
    """

    def __init__(
        self,
        submit: Submit,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        on_first_token: Callable[[float], None] | None = None,
        on_inter_token: Callable[[float], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        self._getter: asyncio.Future | None = None
        self._on_first_token = on_first_token
        self._on_inter_token = on_inter_token
        self.submitted = time.perf_counter()
        self._last_token: float | None = None
        self.finished = False
        self.num_tokens = 0
        self._next_poll: float | None = None
        self._cancel = submit(prompt_ids, params, self._emit)

    def _emit(self, event: SequenceEvent) -> None:
        """Scheduler thread: never block, never raise."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    async def next(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None, poll_s: float = 0.5
    ) -> SequenceEvent:
        """The next event; with ``disconnected``, ask it every ``poll_s`` seconds and raise ClientDisconnected."""
        while True:
            if self._getter is None:
                self._getter = asyncio.ensure_future(self._queue.get())
            if disconnected is None:
                await asyncio.wait({self._getter})
            else:
                now = time.monotonic()
                if self._next_poll is None:
                    self._next_poll = now + poll_s
                await asyncio.wait({self._getter}, timeout=max(0.0, self._next_poll - now))
                if time.monotonic() >= self._next_poll:
                    self._next_poll = time.monotonic() + poll_s
                    if await disconnected():
                        raise ClientDisconnected()
            if not self._getter.done():
                continue
            event = self._getter.result()
            self._getter = None
            self._observe(event)
            return event

    def _observe(self, event: SequenceEvent) -> None:
        if event.finish_reason is not None:
            self.finished = True
        if not event.token_ids:
            return
        now = time.perf_counter()
        self.num_tokens += len(event.token_ids)
        if self._last_token is None:
            if self._on_first_token:
                self._on_first_token(now - self.submitted)
        elif self._on_inter_token:
            self._on_inter_token(now - self._last_token)
        self._last_token = now

    def close(self) -> None:
        """Cancel the sequence unless it finished; idempotent."""
        if self._getter is not None and not self._getter.done():
            self._getter.cancel()
        self._getter = None
        if not self.finished:
            self.finished = True
            self._cancel()
