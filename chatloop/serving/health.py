"""Is every stage answering? The engine's ``describe_stages()`` with a short timeout, off the event loop.

A check asks every stage for its report at once (an RPC each, for workers) in a worker thread,
so the event loop never blocks; concurrent callers share one check, and a result younger
than ``max_age`` is reused. The monitor also checks in the background (every ``interval_s``,
and at once after a request failed), so that new requests fail fast with 503 while a stage
is known to be down instead of waiting for ``cluster.rpc_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import StageReport

__all__ = ["HealthMonitor", "HealthReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthReport:
    """Every stage's report at ``checked_at`` (time.time())."""

    stages: list[StageReport]
    checked_at: float = field(default_factory=time.time)

    @property
    def down(self) -> list[StageReport]:
        return [s for s in self.stages if not s.up]

    @property
    def healthy(self) -> bool:
        return not self.down

    def summary(self) -> str:
        """'worker2 (eof ...), worker3 (...)' for messages."""
        return ", ".join(f"{s.name} ({s.error})" for s in self.down)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.healthy else "unavailable",
            "down": [s.name for s in self.down],
            "stages": [{"name": s.name, "up": s.up, **({"error": s.error} if not s.up else {})} for s in self.stages],
            "checked_at": self.checked_at,
        }


class HealthMonitor:
    """Checks the stages; ``last`` is the latest report (None before the first check)."""

    def __init__(
        self, describe: Callable[[float], list[StageReport]], stage_names: list[str], *, timeout_s: float = 3.0,
        interval_s: float = 10.0,
    ) -> None:
        self.describe = describe
        self.stage_names = list(stage_names)
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.last: HealthReport | None = None
        self._running: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._monitor: asyncio.Task | None = None

    async def check(self, max_age: float = 1.0) -> HealthReport:
        """A report at most ``max_age`` seconds old (0: a fresh one)."""
        if self.last is not None and time.time() - self.last.checked_at <= max_age:
            return self.last
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> HealthReport:
        report = await self._describe()
        if self.last is not None and self.last.healthy and not report.healthy:
            log.error("stage(s) down: %s", report.summary())
        elif self.last is not None and not self.last.healthy and report.healthy:
            log.warning("every stage answers again (%s %s down)", ", ".join(s.name for s in self.last.down),
                        "was" if len(self.last.down) == 1 else "were")
        self.last = report
        return report

    async def _describe(self) -> HealthReport:
        try:
            stages = await asyncio.wait_for(asyncio.to_thread(self.describe, self.timeout_s), self.timeout_s + 2)
        except Exception as e:  # the RPC agent itself is gone or stuck
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            error = f"no answer within {self.timeout_s:.0f} s ({reason})"
            stages = [StageReport.down(name, k, error) for k, name in enumerate(self.stage_names)]
        return HealthReport(stages)

    def latest(self) -> HealthReport | None:
        """The last report, without waiting (None before the first check)."""
        return self.last

    @property
    def down_now(self) -> HealthReport | None:
        """The latest report if a stage is down and not being replaced (new requests then fail fast), else None.

        While a lost worker is being replaced, new requests wait with the others (clients see a delay)."""
        if self.last is None or all(s.up or s.recovering for s in self.last.stages):
            return None
        return self.last

    def note_failure(self) -> None:
        """A request failed in the pipeline: check again now (a dead worker shows up in the next report)."""
        if self._wake is not None:
            self._wake.set()

    # ---- background monitor ------------------------------------------------------------------
    def start(self) -> None:
        """Run checks in the background (call on the event loop)."""
        if self._monitor is not None:
            return
        self._wake = asyncio.Event()
        self._monitor = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except (asyncio.CancelledError, Exception):
                pass
            self._monitor = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await self.check(max_age=0)
            except Exception:  # never let the monitor die
                log.exception("health check failed")
            # While a stage is down, look again soon: it may have come back.
            wait = self.interval_s if self.last is None or self.last.healthy else min(self.interval_s, 2.0)
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
