"""Read and write safetensors files one tensor at a time.

The ``safetensors`` library maps a whole file to read it and wants every tensor in memory
to write one. The splitter must stay near the size of the largest tensor, so it uses this
module: the format is a little-endian u64 header length, a JSON header (dtype, shape, byte
offsets), then the raw bytes. Reads use plain ``read()`` calls so that no mapped pages count
towards the process's memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .integrity import Hasher, hash_file

__all__ = ["TensorInfo", "SafetensorsError", "read_header", "read_tensor", "StreamingWriter", "DTYPES"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file (truncated, corrupt, unknown dtype)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(
                f"{path} is corrupt or truncated: its header claims {header_len} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path} is corrupt: its header is not JSON ({e})") from None
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which ChatLoop cannot read")
        begin, end = entry["data_offsets"]
        info = TensorInfo(path, name, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                          data_start + begin, data_start + end)
        expected = info.dtype.itemsize * _numel(info.shape)
        if info.num_bytes != expected:
            raise SafetensorsError(
                f"{path} is corrupt: tensor {name} has {info.num_bytes} bytes, its shape needs {expected}")
        if info.end > size:
            raise SafetensorsError(
                f"{path} is truncated: tensor {name} ends at byte {info.end}, the file has {size} bytes; "
                "split the model again"
            )
        tensors[name] = info
    return tensors


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.num_bytes:
        with open(info.path, "rb") as f:
            f.seek(info.begin)
            view = out.view(-1).view(torch.uint8).numpy()
            if f.readinto(view) != info.num_bytes:
                raise SafetensorsError(f"{info.path} is truncated inside tensor {info.name}")
    return out


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order the header was declared.

    The header needs every shape up front; the bytes follow one tensor at a time and are
    hashed on the way (sha256, and BLAKE3 where the ``blake3`` package is installed: ``digests``).
    """

    def __init__(
        self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {}}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in layout:
            size = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            self._expected.append((name, dtype, tuple(shape)))
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._file = open(self.path, "wb")  # noqa: SIM115 - written tensor by tensor, closed by close()
        self._hash = Hasher()
        self.digests: dict[str, str] = {}
        """Algorithm -> hex digest of the file, once closed."""
        self._write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._expected[self._next]
        assert (name, tensor.dtype, tuple(tensor.shape)) == expected, f"wrote {name} out of the declared order"
        self._write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> str:
        """Finish the file; return its sha256 (every digest: ``digests``)."""
        assert self._next == len(self._expected), "closed before every tensor was written"
        self._file.close()
        self.digests = self._hash.hexdigests()
        return self.digests["sha256"]


def sha256_of(path: Path, chunk: int = 2**24) -> str:
    """The sha256 of a file, read in chunks."""
    return hash_file(Path(path), "sha256", chunk)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def iter_tensors(infos: list[TensorInfo]) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    """Yield the tensors one after another, each read only when asked for."""
    for info in infos:
        yield info, read_tensor(info)
