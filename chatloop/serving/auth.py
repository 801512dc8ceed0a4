"""The API key: read from the environment or a file, kept in memory only.

A key on the command line shows in ``ps`` and lands in Hydra's run folder, so there is no
option for it: ``CHATLOOP_API_KEY`` or ``server.api_key_file`` (its first line) sets it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import API_KEY_ENV, ServerConfig

__all__ = ["API_KEY_ENV", "load_api_key"]


def load_api_key(server: ServerConfig) -> str | None:
    """The key requests must carry, or None for none; ``ValueError`` when the configured file cannot give one."""
    if server.api_key_file:
        path = Path(server.api_key_file).expanduser()
        try:
            key = path.read_text().splitlines()[0].strip() if path.read_text().strip() else ""
        except OSError as e:
            raise ValueError(f"server.api_key_file={server.api_key_file}: cannot read it ({e.strerror})") from None
        if not key:
            raise ValueError(f"server.api_key_file={server.api_key_file} is empty: write the key on its first line")
        return key
    return os.environ.get(API_KEY_ENV) or None
