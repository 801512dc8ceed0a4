"""Where ChatLoop keeps what it makes once and reuses: converted models, partitions, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "CHATLOOP_CACHE"


def cache_root() -> Path:
    """``$CHATLOOP_CACHE``, or ``~/.cache/chatloop``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "chatloop"))
