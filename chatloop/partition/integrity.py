"""A partition's bytes, hashed every time a stage loads it, against the hash the manifest recorded.

Nothing short of hashing the bytes is trusted: a file's size, mtime and inode say nothing of what it
holds (4 MiB overwritten and ``touch -r`` afterwards keeps all three). The manifest records each
partition's sha256 and, in splits made since, its BLAKE3 (the ``blake3`` package); BLAKE3 is checked
where the manifest has it (2.5-4x sha256's speed here: 3.9 against 1.5 GB/s from the page cache, on
one core), sha256 otherwise (manifests written before).

:func:`start_check` hashes in a thread of its own, so that the loader reads and prepares the weights
meanwhile; the loader waits for its verdict before the stage serves anything. A wrong hash is a
value, :class:`HashMismatch`, whose message names the file, both hashes and what to do.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

try:
    import blake3 as _blake3
except ImportError:  # a dependency; without it, sha256 (every manifest has one) is checked instead
    _blake3 = None

__all__ = ["ALGORITHMS", "HashMismatch", "Hasher", "available", "check", "choose", "hash_file", "start_check"]

ALGORITHMS = ("blake3", "sha256")
"""The hashes a manifest may record, in the order they are preferred for a check (fastest first)."""
CHUNK = 2**24
"""Bytes read at a time (plain ``read``: nothing mapped, nothing counted towards the process's memory)."""


def _new(algorithm: str):
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3" and _blake3 is not None:
        return _blake3.blake3()
    raise ValueError(f"cannot hash with {algorithm!r}: install the blake3 package, or check sha256")


def available() -> tuple[str, ...]:
    """The algorithms this installation can compute."""
    return tuple(a for a in ALGORITHMS if a != "blake3" or _blake3 is not None)


class Hasher:
    """Every available algorithm over the same bytes (the splitter hashes what it writes with this)."""

    def __init__(self, algorithms: tuple[str, ...] | None = None) -> None:
        self._hashes = {a: _new(a) for a in (algorithms or available())}

    def update(self, data: bytes | memoryview) -> None:
        for h in self._hashes.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self._hashes.items()}


@dataclass(frozen=True)
class HashMismatch:
    """A partition whose bytes are not the ones its manifest describes."""

    path: Path
    algorithm: str
    expected: str
    found: str

    @property
    def message(self) -> str:
        return (f"{self.path}: {self.algorithm} differs from the manifest's (expected {self.expected}, found "
                f"{self.found}): the file is corrupt or from another split: copy it again from the splitter's output "
                f"(with manifest.json), or split the model again")


def choose(expected: Mapping[str, str | None]) -> str:
    """The algorithm to check: the fastest one the manifest recorded and this installation computes."""
    for algorithm in available():
        if expected.get(algorithm):
            return algorithm
    raise ValueError(f"the manifest records none of the hashes {', '.join(available())}: split the model again")


def hash_file(path: Path, algorithm: str = "sha256", chunk: int = CHUNK) -> str:
    """The hex digest of ``path``'s bytes, read ``chunk`` bytes at a time into one buffer."""
    digest = _new(algorithm)
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])  # hashlib and blake3 release the GIL on a block this size
    return digest.hexdigest()


def check(path: Path, expected: Mapping[str, str | None]) -> HashMismatch | None:
    """Hash ``path`` with :func:`choose`'s algorithm: None when it matches ``expected``, else the mismatch."""
    algorithm = choose(expected)
    found = hash_file(Path(path), algorithm)
    want = expected[algorithm]
    return None if found == want else HashMismatch(Path(path), algorithm, str(want), found)


def start_check(path: Path, expected: Mapping[str, str | None]) -> Future:
    """:func:`check` on a thread of its own; the future resolves to its result (or raises what it raised)."""
    future: Future = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            future.set_result(check(path, expected))
        except BaseException as e:  # an unreadable file: the caller's wait raises it
            future.set_exception(e)

    threading.Thread(target=run, name=f"chatloop-verify-{Path(path).name}", daemon=True).start()
    return future
