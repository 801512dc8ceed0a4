"""Worker processes this process starts: their output passed through, its last lines kept for error messages.

A worker is a fresh interpreter (``python -m chatloop.runtime``), not a multiprocessing
child: nothing of the caller's ``__main__`` is imported again, so a script without an
``if __name__ == "__main__"`` guard works, and a worker that dies says why in its own words.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..config import ChatLoopConfig
from ..engine.pipeline import stage_name

__all__ = ["WorkerProcess", "write_config"]

log = logging.getLogger(__name__)

TAIL_LINES = 20


def write_config(cfg: ChatLoopConfig) -> Path:
    """The configuration in a private file (0600, in a 0700 folder) for workers to read."""
    folder = Path(tempfile.mkdtemp(prefix="chatloop-"))
    path = folder / "config.pickle"
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        pickle.dump(cfg, f)
    return path


class WorkerProcess:
    """``python -m chatloop.runtime`` for worker ``index``; its stderr goes to ours and its tail is kept."""

    def __init__(self, index: int, arguments: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.name = stage_name(index)
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "chatloop.runtime", *arguments], env=env, stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.pid = self.process.pid
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._pass_through, name=f"chatloop-{self.name}-stderr", daemon=True)
        self._reader.start()

    def _pass_through(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace")
            self._tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # our own stderr is gone (a closed pipe): keep the tail anyway
                pass

    def poll(self) -> int | None:
        """Its exit code, or None while it runs."""
        return self.process.poll()

    def tail(self) -> str:
        """The last lines it wrote to stderr (all of them, once it has exited)."""
        if self.process.poll() is not None:
            self._reader.join(2)
        return "\n".join(self._tail)

    def exit_description(self) -> str:
        """'exited with code 3' / 'was killed by SIGKILL', for messages."""
        code = self.process.poll()
        if code is None:
            return "is running"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; waits for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL (D state)
            log.warning("%s (pid %d) did not exit after SIGKILL", self.name, self.pid)
        self._reader.join(2)
