"""A partition's sha256, checked once: a stamp records which file (inode, size, mtime) was found whole.

Hashing a partition reads all of it (about 1 GB/s here); a stamp beside it (or, where its folder
is read-only, in ``$CHATLOOP_CACHE/verified``) makes later loads of the same, unchanged file
free. The splitter stamps the files it writes: it hashed them as it wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..paths import cache_root
from .safetensors_stream import sha256_of

__all__ = ["STAMP_SUFFIX", "is_stamped", "stamp", "verify"]

STAMP_SUFFIX = ".verified"


def _fingerprint(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}


def _stamp_paths(path: Path) -> list[Path]:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return [path.with_name(path.name + STAMP_SUFFIX), cache_root() / "verified" / f"{key}.json"]


def is_stamped(path: Path, sha256: str) -> bool:
    """Whether this very file (same inode, size and mtime) was found to hash to ``sha256`` before."""
    expected = _fingerprint(path, sha256)
    for candidate in _stamp_paths(path):
        try:
            if json.loads(candidate.read_text()) == expected:
                return True
        except (OSError, ValueError):
            continue
    return False


def stamp(path: Path, sha256: str) -> None:
    """Record that ``path`` hashes to ``sha256`` (beside it, else in the cache; silently nowhere if neither works)."""
    record = json.dumps(_fingerprint(path, sha256))
    for candidate in _stamp_paths(path):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            tmp = candidate.with_name(f".{candidate.name}.{os.getpid()}")
            tmp.write_text(record)
            os.replace(tmp, candidate)
            return
        except OSError:
            continue


def verify(path: Path, sha256: str) -> bool:
    """Whether ``path`` hashes to ``sha256``: from its stamp, or by hashing it (and stamping it if it does)."""
    if is_stamped(path, sha256):
        return True
    if sha256_of(path) != sha256:
        return False
    stamp(path, sha256)
    return True
