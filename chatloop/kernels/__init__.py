"""ChatLoop's native kernels, compiled from C at first use with the system's C compiler.

``gemv.c`` holds the small-batch linear kernel that decode steps run on, ``attention.c`` the
decode attention over the paged KV cache (see their headers). They are built once per CPU into
one library in ``$CHATLOOP_CACHE/kernels`` with ``-march=native -fopenmp`` and loaded with
ctypes, which releases the GIL during a call. Where they cannot be built (no compiler, not
x86-64 with AVX2 and FMA, SIMD turned off, ``CHATLOOP_KERNELS=0``) :func:`load_kernels` returns
None, says why once in the log, and callers keep torch's own kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..paths import cache_root
from ..worker_settings import SIMD_ENV

__all__ = ["MAX_KERNEL_ROWS", "load_kernels", "kernel_decode_attention", "kernel_linear", "stream_read"]

log = logging.getLogger(__name__)

SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
MAX_KERNEL_ROWS = 16
"""Up to this many rows the kernel beats oneDNN's packed GEMM here (1.2-2.2x); more rows go to torch."""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _unavailable_reason() -> str | None:
    if os.environ.get("CHATLOOP_KERNELS", "1") == "0":
        return "CHATLOOP_KERNELS=0"
    if os.environ.get(SIMD_ENV) == "default":
        return "SIMD is off (worker.enable_simd=false)"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is written for x86-64, this is {platform.machine()}"
    flags = _cpu_flags().split()
    if not {"avx2", "fma"} <= set(flags):
        return "this CPU lacks AVX2 or FMA"
    if not shutil.which(os.environ.get("CC", "cc")):
        return f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH: install gcc to build it"
    return None


def _build(compiler: str) -> Path:
    """Compile the C sources for this CPU (once: the file name hashes the sources, flags and CPU)."""
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + _cpu_flags().encode() + compiler.encode())
    target = cache_root() / "kernels" / f"chatloop_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Workers build side by side: each into a file of its own, then an atomic rename.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", scratch],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


@functools.cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None (logged once) where they cannot be built here."""
    reason = _unavailable_reason()
    if reason is None:
        try:
            library = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"))))
        except subprocess.CalledProcessError as e:
            reason = f"the C compiler failed: {e.stderr.strip()[:300]}"
        except (OSError, subprocess.SubprocessError) as e:
            reason = str(e)
        else:
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            library.chatloop_linear.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int]
            library.chatloop_linear.restype = None
            library.chatloop_decode_attention.argtypes = [pointer] * 7 + [size] * 7 + [ctypes.c_float, ctypes.c_int]
            library.chatloop_decode_attention.restype = None
            library.chatloop_stream_read.argtypes = [pointer, size, ctypes.c_int]
            library.chatloop_stream_read.restype = ctypes.c_float
            return library
    log.info("ChatLoop's native kernels are off (%s): linear layers use torch's kernels", reason)
    return None


def _library() -> ctypes.CDLL:
    library = load_kernels()
    if library is None:
        raise RuntimeError(
            f"ChatLoop's native kernels are not available here ({_unavailable_reason() or 'see the log'})")
    return library


def _require(ok: bool, message: str) -> None:
    # Checked on every call, not asserted: a wrong pointer here reads or writes out of bounds.
    if not ok:
        raise ValueError(message)


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` on the native kernel: float32, ``weight`` [out, in] contiguous, any rows.

    Callers check ``load_kernels()`` first and send it at most ``MAX_KERNEL_ROWS`` rows.
    """
    library = _library()
    _require(x.dtype == weight.dtype == torch.float32,
             f"kernel_linear takes float32, got x {x.dtype}, weight {weight.dtype}")
    _require(weight.dim() == 2 and weight.is_contiguous(),
             f"kernel_linear's weight must be a contiguous [out, in] matrix, "
             f"got shape {tuple(weight.shape)}, contiguous={weight.is_contiguous()}")
    out_features, in_features = weight.shape
    _require(x.shape[-1] == in_features, f"kernel_linear: x has {x.shape[-1]} features, the weight takes {in_features}")
    _require(bias is None or (bias.dtype == torch.float32 and bias.shape == (out_features,) and bias.is_contiguous()),
             f"kernel_linear's bias must be a contiguous float32 [{out_features}] vector")
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    library.chatloop_linear(
        x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
        x.numel() // in_features, out_features, in_features, torch.get_num_threads(),
    )
    return out


def kernel_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    lengths: torch.Tensor,
    max_length: int,
) -> torch.Tensor:
    """Attention of one new token per sequence, ``q`` [B, H, D], over the first ``lengths[b]``
    positions of its context in one layer's paged ``keys``/``values`` [slots, K, D], found
    through the block ``tables`` [B, N] (int64) of ``block_size`` slots a block;
    ``max_length`` = ``lengths.max()``. Returns [B, H, D].

    float32 throughout; scale 1/sqrt(D), as SDPA's default. Callers check ``load_kernels()`` first.
    """
    library = _library()
    _require(q.dtype == keys.dtype == values.dtype == torch.float32,
             f"kernel_decode_attention takes float32, got q {q.dtype}, keys {keys.dtype}, values {values.dtype}")
    _require(keys.is_contiguous() and values.is_contiguous(),
             "kernel_decode_attention's keys and values must be contiguous")
    _require(tables.dtype == lengths.dtype == torch.int64, "kernel_decode_attention's tables and lengths must be int64")
    _require(q.dim() == 3 and keys.dim() == 3 and keys.shape == values.shape and keys.shape[2] == q.shape[2],
             f"kernel_decode_attention: q must be [B, H, D] and keys/values [slots, K, D] with the same D, got q "
             f"{tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}")
    (batch, heads, head_dim), kv_heads = q.shape, keys.shape[1]
    _require(heads % kv_heads == 0,
             f"kernel_decode_attention: {heads} query heads are not a multiple of {kv_heads} kv heads")
    _require(tables.dim() == 2 and tables.shape[0] == batch and lengths.shape == (batch,),
             f"kernel_decode_attention: need tables [{batch}, N] and lengths [{batch}], got {tuple(tables.shape)} "
             f"and {tuple(lengths.shape)}")
    _require(0 < max_length <= tables.shape[1] * block_size,
             f"kernel_decode_attention: max_length {max_length} is not within the tables' "
             f"{tables.shape[1] * block_size} slots")
    q, tables, lengths = q.contiguous(), tables.contiguous(), lengths.contiguous()
    out = torch.empty_like(q)
    scratch = torch.empty(batch * heads * max_length, dtype=torch.float32)
    library.chatloop_decode_attention(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), lengths.data_ptr(), scratch.data_ptr(),
        out.data_ptr(), batch, heads, kv_heads, head_dim, tables.shape[1], block_size, max_length,
        head_dim**-0.5, torch.get_num_threads(),
    )
    return out


def stream_read(t: torch.Tensor) -> float:
    """Read a contiguous float32 tensor (numel a multiple of 4096) the way the kernel reads weights."""
    library = _library()
    _require(t.dtype == torch.float32 and t.is_contiguous() and t.numel() % 4096 == 0,
             "stream_read takes a contiguous float32 tensor of a multiple of 4096 elements, "
             f"got {t.dtype} {tuple(t.shape)}")
    return library.chatloop_stream_read(t.data_ptr(), t.numel(), torch.get_num_threads())
