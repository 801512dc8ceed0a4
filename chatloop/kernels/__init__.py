"""ChatLoop's native kernels, compiled from C at first use with the system's C compiler.

``gemv.c`` holds the small-batch linear kernel that decode steps run on, ``attention.c`` the
decode attention over the paged KV cache, ``rowops.c`` RMSNorm and rotary embeddings, ``layers.c`` a whole
decode step through a stage's Llama layers in one call (see their headers). They are built once per CPU into
one library in ``$CHATLOOP_CACHE/kernels`` with ``-march=native -fopenmp`` (``CHATLOOP_KERNEL_MARCH`` replaces
``native``, see :data:`MARCH_ENV`) and loaded with
ctypes, which releases the GIL during a call. Where they cannot be built (no compiler, not
x86-64 with AVX2 and FMA, SIMD turned off, ``CHATLOOP_KERNELS=0``) :func:`load_kernels` returns
None, says why once in the log, and callers keep torch's own kernels.

``qgemv.c``, the quantized linear kernel, ``bf16gemv.c``, the bfloat16 one, and the decode kernels of GGUF's other
types (``kquant.c``: the k-quants; ``ggufgemv.c``: q5_0, q5_1, f16 and bf16 blocks) are a library of their own, built
without ``-march=native``: each holds a portable, an AVX2 and an AVX-512 (VNNI, or BF16) path, and :func:`quant_isa`
and :func:`bf16_isa` pick one at run time from what the CPU has (``CHATLOOP_ISA`` and ``CHATLOOP_BF16_ISA`` force
one, for tests and comparisons).
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

__all__ = [
    "BF16_ISAS", "BF16_KERNEL_ROWS", "BLOCK_BYTES", "FORMAT_IDS", "FUSED_FAMILY", "ISAS", "MARCH_ENV",
    "MAX_KERNEL_ROWS",
    "LlamaLayerSpec", "LlamaShapeSpec", "MatrixSpec", "MoELayerSpec",
    "available_bf16_isas", "available_isas", "bf16_isa", "bf16_linear_unchecked", "fused_format",
    "kernel_bf16_linear",
    "kernel_decode_attention", "kernel_dequantize_rows", "kernel_interleave", "kernel_kquant_linear",
    "GGUF_FORMAT_IDS", "KQUANT_FORMAT_IDS", "TILED", "gguf_linear_unchecked", "kernel_gguf_linear",
    "kernel_kquant_interleave", "kernel_kquant_rows", "kquant_linear_unchecked",
    "kernel_linear", "kernel_quant_linear", "kernel_rms_norm", "kernel_rope_", "load_kernels", "load_quant_kernels",
    "quant_isa", "quant_linear_unchecked", "stream_read",
]

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / name for name in ("attention.c", "gemv.c", "layers.c", "rowops.c")]
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
MARCH_ENV = "CHATLOOP_KERNEL_MARCH"
"""Set, it replaces ``native`` in ``-march=native`` for these kernels (``x86-64-v3``: AVX2 and FMA, no AVX-512): the
tests build an AVX2-only machine's code this way on an AVX-512 CPU."""
QUANT_SOURCES = [Path(__file__).parent / name for name in ("qgemv.c", "bf16gemv.c", "kquant.c", "ggufgemv.c")]
QUANT_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
ISAS = {"portable": (0, set()), "avx2": (1, {"avx2", "fma", "f16c"}),
        "avx512_vnni": (2, {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})}
"""The quantized kernel's paths: (its number in qgemv.c, the CPU flags it needs), slowest first."""
BF16_ISAS = {"portable": (0, set()), "avx2": (1, {"avx2", "fma"}),
             "avx512_bf16": (2, {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"})}
"""The bfloat16 kernel's paths, as ``ISAS`` (bf16gemv.c)."""
FORMAT_IDS = {"q8_0": 0, "q4_1": 1, "q4_1_x16": 2, "q8_0_x16": 3}
"""The quantized kernel's weight layouts (qgemv.c): GGUF's blocks, and the same interleaved in tiles of 16 rows
(:func:`kernel_interleave`), which only the kernel reads."""
BLOCK_BYTES = {"q8_0": 34, "q4_1": 20, "q4_0": 18}
"""Bytes of a block of 32 weights in each of GGUF's 32-weight formats ChatLoop quantizes to (:mod:`chatloop.quant`
reads them from here: the kernels' layouts are defined in this package, which imports nothing of ``quant``)."""
KQUANT_FORMAT_IDS = {"q4_k": 0, "q6_k": 1, "q5_k": 2, "q3_k": 3, "q2_k": 4, "q4_k_x16": 5, "q5_k_x16": 6,
                     "q6_k_x16": 7}
"""The k-quant decode kernel's formats (kquant.c): GGUF's blocks of 256, activations quantized to Q8_K; ``q4_k_x16``,
``q5_k_x16`` and ``q6_k_x16`` are q4_k, q5_k and q6_k in tiles of 16 rows (:func:`kernel_kquant_interleave`), which
only the kernel reads."""
KQUANT_BLOCK_BYTES = {"q4_k": 144, "q6_k": 210, "q5_k": 176, "q3_k": 110, "q2_k": 84, "q4_k_x16": 144,
                      "q5_k_x16": 176, "q6_k_x16": 210}
GGUF_FORMAT_IDS = {"q5_0": 0, "q5_1": 1, "f16": 2, "bf16": 3, "q5_0_x16": 4, "q5_1_x16": 5}
"""The decode kernel of GGUF's other kept types (ggufgemv.c): q5_0 and q5_1 with activations quantized in blocks
of 32 (Q8_0 / Q8_1), f16 and bf16 with float32 activations; ``q5_0_x16`` and ``q5_1_x16`` are q5_0 and q5_1 in tiles
of 16 rows (:func:`kernel_kquant_interleave`), which only the kernel reads."""
GGUF_ROW_BYTES = {"q5_0": (32, 22), "q5_1": (32, 24), "f16": (1, 2), "bf16": (1, 2), "q5_0_x16": (32, 22),
                  "q5_1_x16": (32, 24)}
TILED = {"q4_k": ("chatloop_kquant", 144), "q5_k": ("chatloop_kquant", 176), "q6_k": ("chatloop_kquant", 210),
         "q5_0": ("chatloop_gguf", 22), "q5_1": ("chatloop_gguf", 24)}
"""Formats with a layout in tiles of 16 rows (``_x16``) beside qgemv.c's: the C functions' prefix, bytes a block."""
MAX_KERNEL_ROWS = 16
"""Up to this many rows the kernel beats oneDNN's packed GEMM here (1.2-2.2x); more rows go to torch."""
BF16_KERNEL_ROWS = 3
"""Up to this many rows the bfloat16 kernel beats oneDNN's (11008 x 4096 and 4096 x 11008 from memory, AVX512-BF16,
2 threads: 1.4-1.5x at 1 row, 1.25-1.35x at 2, 1.0-1.15x at 3; oneDNN 1.07-1.17x faster at 4, 2x at 16)."""


FUSED_FAMILY = 100
"""The one-call decode step's format numbers (layers.c): a quantized layout is ``FUSED_FAMILY * family + its
number``, family 0 ``FORMAT_IDS`` (qgemv.c), 1 ``KQUANT_FORMAT_IDS`` (kquant.c), 2 ``GGUF_FORMAT_IDS``
(ggufgemv.c); see :func:`fused_format`."""


def fused_format(fmt: str) -> int | None:
    """The one-call decode step's number for quantized layout ``fmt``, or None where no kernel decodes it."""
    for family, ids in enumerate((FORMAT_IDS, KQUANT_FORMAT_IDS, GGUF_FORMAT_IDS)):
        if fmt in ids:
            return FUSED_FAMILY * family + ids[fmt]
    return None


class MatrixSpec(ctypes.Structure):
    """One matrix of a fused decode step (``chatloop_matrix`` in layers.c): format -1 is float32 [out, in], else
    a quantized layout's number (:func:`fused_format`); ``out_features`` 0: no matrix (an unused part)."""

    _fields_ = [("format", ctypes.c_int64), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64)]


class MoELayerSpec(ctypes.Structure):
    """A sparse MLP for ``chatloop_llama_decode`` (``chatloop_moe_layer`` in layers.c): the float32 router [E, C]
    and arrays of every expert's merged gate/up and down weights' addresses, all of one format pair
    (:func:`fused_format` numbers) and one row size each."""

    _fields_ = [("router", ctypes.c_void_p), ("gate_up", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("gate_up_format", ctypes.c_int64), ("down_format", ctypes.c_int64),
                ("gate_up_row_bytes", ctypes.c_int64), ("down_row_bytes", ctypes.c_int64)]


class LlamaLayerSpec(ctypes.Structure):
    """One Llama layer's weights for ``chatloop_llama_decode`` (``chatloop_llama_layer`` in layers.c): ``qkv`` the
    q, k and v projections (or one fused, then two empty specs), ``gate_up`` the gate and up ones (or one fused);
    ``q_norm`` and ``k_norm`` Qwen3's per-head norms (None: none), ``moe`` a sparse MLP's spec (None: the dense
    ``gate_up`` and ``down``)."""

    _fields_ = [("qkv", MatrixSpec * 3), ("o", MatrixSpec), ("gate_up", MatrixSpec * 2), ("down", MatrixSpec),
                ("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("moe", ctypes.POINTER(MoELayerSpec))]


class LlamaShapeSpec(ctypes.Structure):
    """A Llama stage's sizes and its quantized kernels (``chatloop_llama_shape`` in layers.c): the addresses of
    the quantized library's ``*_linear_shared`` functions and the path they take; ``attention_scale`` (0, the
    default: 1/sqrt(head_dim)) and ``residual_multiplier`` (default 1: each sublayer's output added unscaled) are
    Granite's ``attention_multiplier`` and ``residual_multiplier``; ``experts`` (0: no sparse layer), ``top_k``,
    ``expert_intermediate`` and ``norm_topk_prob`` a mixture of experts' routing, ``moe_experts`` the address of
    experts.c's ``chatloop_moe_experts_shared`` and ``moe_kernels`` of its ``chatloop_moe_kernels``."""

    _fields_ = [("hidden", ctypes.c_int64), ("heads", ctypes.c_int64), ("kv_heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64), ("eps", ctypes.c_float),
                ("quant_linear", ctypes.c_void_p), ("isa", ctypes.c_int64), ("kquant_linear", ctypes.c_void_p),
                ("gguf_linear", ctypes.c_void_p), ("attention_scale", ctypes.c_float),
                ("residual_multiplier", ctypes.c_float), ("experts", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("expert_intermediate", ctypes.c_int64), ("norm_topk_prob", ctypes.c_int64),
                ("moe_experts", ctypes.c_void_p), ("moe_kernels", ctypes.c_void_p)]

    def __init__(self, *args, **kwargs) -> None:
        if len(args) < len(self._fields_):  # ctypes would leave it 0, which would drop every sublayer
            kwargs.setdefault("residual_multiplier", 1.0)
        super().__init__(*args, **kwargs)


@functools.cache
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


def _kernel_flags() -> list[str]:
    return ["-O3", f"-march={os.environ.get(MARCH_ENV) or 'native'}", "-fopenmp", "-shared", "-fPIC"]


def _build(compiler: str, sources: list[Path] = SOURCES, flags: list[str] | None = None,
           name: str = "chatloop_kernels", libraries: tuple[str, ...] = ()) -> Path:
    """Compile C sources for this CPU (once: the file name hashes the sources, flags and CPU)."""
    flags = _kernel_flags() if flags is None else flags
    text = b"".join(source.read_bytes() for source in sources + HEADERS)
    key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_flags().encode() + compiler.encode())
    target = cache_root() / "kernels" / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Workers build side by side: each into a file of its own, then an atomic rename.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, *map(str, sources), "-o", scratch, *libraries],
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
            if os.environ.get(MARCH_ENV):
                reason += f" ({MARCH_ENV}={os.environ[MARCH_ENV]}: unset it, or name a -march the compiler knows)"
        except (OSError, subprocess.SubprocessError) as e:
            reason = str(e)
        else:
            pointer, size = ctypes.c_void_p, ctypes.c_int64
            library.chatloop_linear.argtypes = [pointer, pointer, pointer, pointer, size, size, size, ctypes.c_int]
            library.chatloop_linear.restype = None
            library.chatloop_decode_attention.argtypes = [pointer] * 8 + [size] * 7 + [ctypes.c_float, ctypes.c_int,
                                                                                        ctypes.c_int]
            library.chatloop_decode_attention.restype = None
            library.chatloop_stream_read.argtypes = [pointer, size, ctypes.c_int]
            library.chatloop_stream_read.restype = ctypes.c_float
            library.chatloop_rms_norm.argtypes = [pointer] * 3 + [size] * 2 + [ctypes.c_float]
            library.chatloop_rms_norm.restype = None
            library.chatloop_rope.argtypes = [pointer] * 3 + [size] * 5
            library.chatloop_rope.restype = None
            library.chatloop_llama_decode_scratch.argtypes = [pointer, size, size]
            library.chatloop_llama_decode_scratch.restype = size
            library.chatloop_llama_decode_moe_scratch.argtypes = [pointer, size]
            library.chatloop_llama_decode_moe_scratch.restype = size
            library.chatloop_llama_decode.argtypes = ([pointer, pointer, size, pointer, pointer, pointer, size]
                                                      + [pointer] * 3 + [size] * 3 + [pointer] * 2
                                                      + [size, pointer, ctypes.c_int, pointer])
            library.chatloop_llama_decode.restype = size
            return library
    log.info("ChatLoop's native kernels are off (%s): linear layers use torch's kernels", reason)
    return None


def kquant_linear_unchecked(x: torch.Tensor, data: torch.Tensor, fmt: str, in_features: int,
                            bias: torch.Tensor | None, isa_id: int) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` in a k-quant of ``KQUANT_FORMAT_IDS`` (``x`` contiguous float32 [..., in],
    ``data`` contiguous uint8 [out, in / 256 * block bytes], checked by the caller), on kquant.c."""
    rows = x.numel() // in_features
    out = torch.empty(*x.shape[:-1], data.shape[0], dtype=torch.float32)
    xq = torch.empty(rows * in_features, dtype=torch.int8)
    xd = torch.empty(rows * in_features // 256, dtype=torch.float32)
    bsums = torch.empty(rows * in_features // 16, dtype=torch.int16)
    load_quant_kernels().chatloop_kquant_linear(
        x.data_ptr(), data.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), rows,
        data.shape[0], in_features, KQUANT_FORMAT_IDS[fmt], isa_id, torch.get_num_threads(), xq.data_ptr(),
        xd.data_ptr(), bsums.data_ptr(),
    )
    return out


def kernel_kquant_linear(x: torch.Tensor, data: torch.Tensor, fmt: str, bias: torch.Tensor | None = None,
                         isa: str | None = None) -> torch.Tensor:
    """:func:`kquant_linear_unchecked` with its checks: ``fmt`` one of ``KQUANT_FORMAT_IDS``, ``isa`` a path of
    :func:`available_isas` (default :func:`quant_isa`)."""
    isa_id = _check_block_linear("kernel_kquant_linear", x, data, fmt, bias, isa, KQUANT_FORMAT_IDS,
                                 256, KQUANT_BLOCK_BYTES.get(fmt, 0))
    return kquant_linear_unchecked(x.contiguous(), data, fmt, x.shape[-1],
                                   None if bias is None else bias.contiguous(), isa_id)


def _check_block_linear(name: str, x: torch.Tensor, data: torch.Tensor, fmt: str, bias: torch.Tensor | None,
                        isa: str | None, formats: dict[str, int], weights: int, block_bytes: int) -> int:
    """Check a block-quantized matrix ``data`` (``weights`` weights in ``block_bytes`` bytes a block) against ``x``
    and ``bias`` before a kernel reads them; the number of the path ``isa`` (default :func:`quant_isa`)."""
    _require(load_quant_kernels() is not None, "ChatLoop's quantized kernels are not available here (see the log)")
    _require(fmt in formats, f"{name}: format {fmt!r} is not one of {', '.join(formats)}")
    in_features = x.shape[-1]
    _require(in_features % weights == 0 and data.dtype == torch.uint8 and data.dim() == 2 and data.is_contiguous()
             and data.shape[1] * weights == in_features * block_bytes,
             f"{name}: a {fmt} matrix of {in_features} inputs is contiguous uint8 "
             f"[out, {in_features // weights * block_bytes}], got {data.dtype} {tuple(data.shape)}")
    _require(not fmt.endswith("_x16") or data.shape[0] % 16 == 0,
             f"{name}: a {fmt} matrix has a multiple of 16 rows, got {data.shape[0]}")
    _require(x.dtype == torch.float32, f"{name}: x must be float32, got {x.dtype}")
    _require(bias is None or (bias.dtype == torch.float32 and bias.shape == (data.shape[0],)),
             f"{name}: bias must be float32 [{data.shape[0]}]")
    isa = isa or quant_isa()
    _require(isa in available_isas(), f"{name}: this CPU cannot run the {isa!r} path")
    return ISAS[isa][0]


def kernel_kquant_interleave(data: torch.Tensor, fmt: str = "q4_k", in_place: bool = False,
                             inverse: bool = False) -> tuple[torch.Tensor, str]:
    """A ``q4_k``, ``q5_k``, ``q6_k`` (kquant.c), ``q5_0`` or ``q5_1`` (ggufgemv.c) matrix [out, bytes] (out a
    multiple of 16) in tiles of 16 rows (``q4_k_x16``, ...: the same bytes, rearranged so that VNNI computes 16 rows at
    once), and the layout's name; ``inverse``: such a matrix (``fmt`` its ``_x16`` name) back to GGUF's rows, and the
    rows' name. ``in_place``: in ``data``'s own memory."""
    library = load_quant_kernels()
    _require(library is not None, "ChatLoop's quantized kernels are not available here (see the log)")
    rows = fmt.removesuffix("_x16")
    _require(rows in TILED and fmt.endswith("_x16") == inverse,
             f"kernel_kquant_interleave: cannot rearrange {fmt!r}{' back' if inverse else ''}")
    prefix, nbytes = TILED[rows]
    _require(data.dtype == torch.uint8 and data.dim() == 2 and data.is_contiguous() and data.shape[0] % 16 == 0
             and data.shape[1] % nbytes == 0,
             f"kernel_kquant_interleave: need a contiguous uint8 {fmt} matrix of a multiple of 16 rows, got "
             f"{data.dtype} {tuple(data.shape)}")
    out = data if in_place else torch.empty_like(data)
    ids = KQUANT_FORMAT_IDS if prefix == "chatloop_kquant" else GGUF_FORMAT_IDS
    if getattr(library, f"{prefix}_interleave")(data.data_ptr(), out.data_ptr(), data.shape[0],
                                                data.shape[1] // nbytes, ids[rows], int(inverse)) != 0:
        raise MemoryError(f"kernel_kquant_interleave: no memory for one tile of 16 rows of {tuple(data.shape)}")
    return out, rows if inverse else f"{rows}_x16"


def kernel_kquant_rows(data: torch.Tensor, ids: torch.Tensor, fmt: str = "q4_k_x16") -> torch.Tensor:
    """Rows ``ids`` (int64, 1-d) of a matrix in tiles of 16 rows (``fmt``: ``q4_k_x16``, ``q5_k_x16``, ``q6_k_x16``,
    ``q5_0_x16``, ``q5_1_x16``) as GGUF's rows [len(ids), bytes] (prefill dequantizes those)."""
    library = load_quant_kernels()
    _require(library is not None, "ChatLoop's quantized kernels are not available here (see the log)")
    rows = fmt.removesuffix("_x16")
    _require(fmt.endswith("_x16") and rows in TILED, f"kernel_kquant_rows: {fmt!r} is not a layout in tiles")
    prefix, nbytes = TILED[rows]
    _require(data.dtype == torch.uint8 and data.dim() == 2 and data.is_contiguous() and data.shape[0] % 16 == 0
             and data.shape[1] % nbytes == 0, f"kernel_kquant_rows: need a contiguous uint8 {fmt} matrix")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    _require(bool(((flat >= 0) & (flat < data.shape[0])).all()),
             f"kernel_kquant_rows: ids outside [0, {data.shape[0]})")
    out = torch.empty(flat.numel(), data.shape[1], dtype=torch.uint8)
    ids = KQUANT_FORMAT_IDS if prefix == "chatloop_kquant" else GGUF_FORMAT_IDS
    getattr(library, f"{prefix}_x16_rows")(data.data_ptr(), flat.data_ptr(), out.data_ptr(), flat.numel(),
                                           data.shape[1] // nbytes, ids[rows])
    return out


def gguf_linear_unchecked(x: torch.Tensor, data: torch.Tensor, fmt: str, in_features: int,
                          bias: torch.Tensor | None, isa_id: int) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` in a format of ``GGUF_FORMAT_IDS`` (``x`` contiguous float32 [..., in],
    ``data`` contiguous uint8 [out, row bytes], checked by the caller), on ggufgemv.c."""
    rows = x.numel() // in_features
    out = torch.empty(*x.shape[:-1], data.shape[0], dtype=torch.float32)
    if fmt.startswith("q5_"):
        xq = torch.empty(rows * in_features, dtype=torch.int8)
        xd = torch.empty(2 * rows * in_features // 32, dtype=torch.float32)  # d, then s
        pointers = xq.data_ptr(), xd.data_ptr(), xd.data_ptr() + rows * in_features // 32 * 4
    else:
        pointers = None, None, None
    load_quant_kernels().chatloop_gguf_linear(
        x.data_ptr(), data.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), rows,
        data.shape[0], in_features, GGUF_FORMAT_IDS[fmt], isa_id, torch.get_num_threads(), *pointers,
    )
    return out


def kernel_gguf_linear(x: torch.Tensor, data: torch.Tensor, fmt: str, bias: torch.Tensor | None = None,
                       isa: str | None = None) -> torch.Tensor:
    """:func:`gguf_linear_unchecked` with its checks: ``fmt`` one of ``GGUF_FORMAT_IDS``, ``isa`` a path of
    :func:`available_isas` (default :func:`quant_isa`)."""
    isa_id = _check_block_linear("kernel_gguf_linear", x, data, fmt, bias, isa, GGUF_FORMAT_IDS,
                                 *GGUF_ROW_BYTES.get(fmt, (1, 0)))
    return gguf_linear_unchecked(x.contiguous(), data, fmt, x.shape[-1],
                                 None if bias is None else bias.contiguous(), isa_id)


@functools.cache
def load_quant_kernels() -> ctypes.CDLL | None:
    """The quantized kernels' library, or None (logged once): quantized layers then compute in torch."""
    reason = None
    if os.environ.get("CHATLOOP_KERNELS", "1") == "0":
        reason = "CHATLOOP_KERNELS=0"
    elif platform.machine() not in ("x86_64", "AMD64"):
        reason = f"the kernel is written for x86-64, this is {platform.machine()}"
    elif not shutil.which(os.environ.get("CC", "cc")):
        reason = f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH: install gcc to build it"
    else:
        try:
            library = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"), QUANT_SOURCES, QUANT_FLAGS,
                                              "chatloop_quant_kernels", ("-lm",))))
        except subprocess.CalledProcessError as e:
            reason = f"the C compiler failed: {e.stderr.strip()[:300]}"
        except (OSError, subprocess.SubprocessError) as e:
            reason = str(e)
        else:
            pointer, size, integer = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            library.chatloop_quant_linear.argtypes = [pointer] * 4 + [size] * 3 + [integer] * 3 + [pointer] * 3
            library.chatloop_quant_linear.restype = None
            library.chatloop_dequantize_rows.argtypes = [pointer] * 3 + [size] * 2 + [integer]
            library.chatloop_dequantize_rows.restype = None
            library.chatloop_interleave.argtypes = [pointer, pointer, size, size, integer]
            library.chatloop_interleave.restype = integer
            library.chatloop_bf16_linear.argtypes = [pointer] * 4 + [size] * 3 + [integer] * 2 + [pointer]
            library.chatloop_bf16_linear.restype = None
            library.chatloop_kquant_linear.argtypes = [pointer] * 4 + [size] * 3 + [integer] * 3 + [pointer] * 3
            library.chatloop_kquant_linear.restype = None
            library.chatloop_gguf_linear.argtypes = [pointer] * 4 + [size] * 3 + [integer] * 3 + [pointer] * 3
            library.chatloop_gguf_linear.restype = None
            library.chatloop_kquant_interleave.argtypes = [pointer, pointer, size, size, integer, integer]
            library.chatloop_kquant_interleave.restype = integer
            library.chatloop_kquant_x16_rows.argtypes = [pointer, pointer, pointer, size, size, integer]
            library.chatloop_kquant_x16_rows.restype = None
            library.chatloop_gguf_interleave.argtypes = [pointer, pointer, size, size, integer, integer]
            library.chatloop_gguf_interleave.restype = integer
            library.chatloop_gguf_x16_rows.argtypes = [pointer, pointer, pointer, size, size, integer]
            library.chatloop_gguf_x16_rows.restype = None
            return library
    log.info("ChatLoop's quantized kernels are off (%s): quantized layers dequantize into torch's kernels", reason)
    return None


def available_isas(table: dict = ISAS) -> list[str]:
    """The paths of a kernel (``ISAS``: quantized, ``BF16_ISAS``: bfloat16) this CPU can run, slowest first (empty
    where the kernels are off)."""
    if load_quant_kernels() is None:
        return []
    if os.environ.get(SIMD_ENV) == "default":  # worker.enable_simd=false
        return ["portable"]
    present = _present_flags()  # parsed once: quantized and bfloat16 layers ask on every call
    return [name for name, (_, needs) in table.items() if needs <= present]


@functools.cache
def _present_flags() -> frozenset[str]:
    return frozenset(_cpu_flags().split())


def available_bf16_isas() -> list[str]:
    """The bfloat16 kernel's paths this CPU can run, slowest first."""
    return available_isas(BF16_ISAS)


def _chosen_isa(table: dict, variable: str) -> str:
    available = available_isas(table)
    forced = os.environ.get(variable)
    if forced:
        if forced not in available:
            raise ValueError(f"{variable}={forced}: this machine runs {', '.join(available) or 'none'}")
        return forced
    return available[-1] if available else "none"


def quant_isa() -> str:
    """The path quantized layers use: ``CHATLOOP_ISA`` if set (it must be one this CPU runs), else the fastest."""
    return _chosen_isa(ISAS, "CHATLOOP_ISA")


def bf16_isa() -> str:
    """The path bfloat16 decode matmuls use: ``CHATLOOP_BF16_ISA`` if set, else the fastest this CPU runs."""
    return _chosen_isa(BF16_ISAS, "CHATLOOP_BF16_ISA")


def kernel_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       isa: str | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` in bfloat16 on ChatLoop's kernel (float32 sums, one rounding, as torch's); ``isa``:
    a path of :func:`available_bf16_isas` (default :func:`bf16_isa`)."""
    if load_quant_kernels() is None:
        raise RuntimeError("ChatLoop's bfloat16 kernel is not available here (see the log)")
    isa = isa or bf16_isa()
    _require(isa in available_bf16_isas(), f"kernel_bf16_linear: isa {isa!r} is not one of {available_bf16_isas()}")
    _require(x.dtype == weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.is_contiguous()
             and x.shape[-1] == weight.shape[1],
             f"kernel_bf16_linear takes bfloat16 x [..., in] and a contiguous weight [out, in], got x {x.dtype} "
             f"{tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    _require(bias is None or (bias.dtype == torch.bfloat16 and bias.shape == (weight.shape[0],)
                              and bias.is_contiguous()),
             f"kernel_bf16_linear's bias must be a contiguous bfloat16 [{weight.shape[0]}] vector")
    return bf16_linear_unchecked(x.contiguous(), weight, bias, BF16_ISAS[isa][0])


def bf16_linear_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          isa_id: int) -> torch.Tensor:
    """:func:`kernel_bf16_linear` without its checks, for layers that checked their weight when loaded."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    out = torch.empty(*x.shape[:-1], out_features, dtype=torch.bfloat16)
    scratch = torch.empty(rows * in_features, dtype=torch.float32)
    load_quant_kernels().chatloop_bf16_linear(
        x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), rows,
        out_features, in_features, isa_id, torch.get_num_threads(), scratch.data_ptr(),
    )
    return out


def kernel_quant_linear(x: torch.Tensor, data: torch.Tensor, fmt: str, in_features: int,
                        bias: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` quantized as ``fmt`` (a name of ``FORMAT_IDS``) in ``data``
    [out, bytes]: the activations are quantized in blocks of 32 too (see ``qgemv.c``). ``isa``: a path of
    :func:`available_isas` (default :func:`quant_isa`)."""
    library = load_quant_kernels()
    if library is None:
        raise RuntimeError("ChatLoop's quantized kernels are not available here (see the log)")
    isa = isa or quant_isa()
    _require(isa in available_isas(), f"kernel_quant_linear: isa {isa!r} is not one of {available_isas()}")
    _require(fmt in FORMAT_IDS, f"kernel_quant_linear: format {fmt!r} is not one of {', '.join(FORMAT_IDS)}")
    block_bytes = _block_bytes(fmt)
    _require(data.dtype == torch.uint8 and data.dim() == 2 and data.is_contiguous()
             and data.shape[1] * 32 == in_features * block_bytes,
             f"kernel_quant_linear: a {fmt} matrix of {in_features} inputs is contiguous uint8 "
             f"[out, {in_features // 32 * block_bytes}], got {data.dtype} {tuple(data.shape)}")
    _require(x.dtype == torch.float32 and x.shape[-1] == in_features,
             f"kernel_quant_linear takes float32 x with {in_features} features, got {x.dtype} {tuple(x.shape)}")
    out_features = data.shape[0]
    _require(not fmt.endswith("_x16") or out_features % 16 == 0,
             f"kernel_quant_linear: a {fmt} matrix has a multiple of 16 rows, got {out_features}")
    _require(bias is None or (bias.dtype == torch.float32 and bias.shape == (out_features,) and bias.is_contiguous()),
             f"kernel_quant_linear's bias must be a contiguous float32 [{out_features}] vector")
    return quant_linear_unchecked(x.contiguous(), data, FORMAT_IDS[fmt], in_features, bias, ISAS[isa][0])


def quant_linear_unchecked(x: torch.Tensor, data: torch.Tensor, fmt_id: int, in_features: int,
                           bias: torch.Tensor | None, isa_id: int) -> torch.Tensor:
    """:func:`kernel_quant_linear` without its checks, for layers that checked their weight once when loaded
    (``x`` contiguous float32). A decode step makes ~200 of these calls: each microsecond counts."""
    rows = x.numel() // in_features
    out = torch.empty(*x.shape[:-1], data.shape[0], dtype=torch.float32)
    scratch = torch.empty(rows * in_features * 2, dtype=torch.uint8)  # int8 rows, then two floats a block
    address = scratch.data_ptr()
    load_quant_kernels().chatloop_quant_linear(
        x.data_ptr(), data.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), rows,
        data.shape[0], in_features, fmt_id, isa_id, torch.get_num_threads(), address, address + rows * in_features,
        address + rows * in_features * 9 // 8,
    )
    return out


def kernel_interleave(data: torch.Tensor, fmt: str, in_place: bool = False) -> tuple[torch.Tensor, str]:
    """A ``q4_1`` or ``q8_0`` matrix [out, bytes] (out a multiple of 16) in the kernel's interleaved layout, and the
    layout's name (``q4_1_x16``, ``q8_0_x16``): the same number of bytes, rearranged so that VNNI computes a block
    for 16 rows at once (qgemv.c); ``in_place``: in ``data``'s own memory."""
    library = load_quant_kernels()
    if library is None:
        raise RuntimeError("ChatLoop's quantized kernels are not available here (see the log)")
    _require(fmt in ("q4_1", "q8_0"), f"kernel_interleave: format {fmt!r} is not q4_1 or q8_0")
    block_bytes = _block_bytes(fmt)
    _require(data.dtype == torch.uint8 and data.dim() == 2 and data.is_contiguous() and data.shape[0] % 16 == 0
             and data.shape[1] % block_bytes == 0,
             f"kernel_interleave: need a contiguous uint8 {fmt} matrix of a multiple of 16 rows, got "
             f"{data.dtype} {tuple(data.shape)}")
    out = data if in_place else torch.empty_like(data)
    if library.chatloop_interleave(data.data_ptr(), out.data_ptr(), data.shape[0], data.shape[1] // block_bytes,
                                   FORMAT_IDS[fmt]) != 0:
        raise MemoryError(f"kernel_interleave: no memory for one tile of 16 rows of {tuple(data.shape)}")
    return out, f"{fmt}_x16"


def kernel_dequantize_rows(data: torch.Tensor, ids: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """Rows ``ids`` (any shape, int64) of a quantized matrix as float32 [*ids.shape, in_features]."""
    library = load_quant_kernels()
    if library is None:
        raise RuntimeError("ChatLoop's quantized kernels are not available here (see the log)")
    _require(fmt in FORMAT_IDS and data.dtype == torch.uint8 and data.is_contiguous(),
             f"kernel_dequantize_rows: need a contiguous uint8 {fmt} matrix")
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    _require(bool(((flat >= 0) & (flat < data.shape[0])).all()),
             f"kernel_dequantize_rows: ids outside [0, {data.shape[0]})")
    out = torch.empty(flat.numel(), in_features, dtype=torch.float32)
    library.chatloop_dequantize_rows(data.data_ptr(), flat.data_ptr(), out.data_ptr(), flat.numel(), in_features,
                                     FORMAT_IDS[fmt])
    return out.reshape(*ids.shape, in_features)


def _block_bytes(fmt: str) -> int:
    """Bytes of a block of 32 weights in layout ``fmt`` (an interleaved one keeps its format's)."""
    return BLOCK_BYTES[fmt.removesuffix("_x16")]


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
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence, ``q`` [B, H, D], over the first ``lengths[b]``
    positions of its context in one layer's paged ``keys``/``values`` [slots, K, D], found
    through the block ``tables`` [B, N] (int64) of ``block_size`` slots a block;
    ``max_length`` = ``lengths.max()``. Returns [B, H, D].

    ``starts`` [B] (int64, a sliding window): each sequence attends to positions ``starts[b]`` to
    ``lengths[b] - 1`` only, and the blocks before ``starts[b]`` are not read (they may name any block).

    The cache is float32 or bfloat16 (read as float32), ``q`` and the result float32; the sums are float32 either
    way. Scale 1/sqrt(D), as SDPA's default. Callers check ``load_kernels()`` first.
    """
    library = _library()
    _require(q.dtype == torch.float32 and keys.dtype == values.dtype in (torch.float32, torch.bfloat16),
             f"kernel_decode_attention takes a float32 q and float32 or bfloat16 keys and values, got q {q.dtype}, "
             f"keys {keys.dtype}, values {values.dtype}")
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
    if starts is not None:
        _require(starts.dtype == torch.int64 and starts.shape == (batch,),
                 f"kernel_decode_attention: starts must be int64 [{batch}], got {starts.dtype} {tuple(starts.shape)}")
        _require(bool(((starts >= 0) & (starts < lengths)).all()),
                 "kernel_decode_attention: every start must be within 0..length-1 (a window sees the new token)")
        starts = starts.contiguous()
    q, tables, lengths = q.contiguous(), tables.contiguous(), lengths.contiguous()
    out = torch.empty_like(q)
    scratch = torch.empty(batch * heads * max_length, dtype=torch.float32)
    library.chatloop_decode_attention(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
        None if starts is None else starts.data_ptr(), scratch.data_ptr(), out.data_ptr(), batch, heads, kv_heads,
        head_dim, tables.shape[1], block_size, max_length,
        head_dim**-0.5, keys.dtype == torch.bfloat16, torch.get_num_threads(),
    )
    return out


def kernel_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of a contiguous float32 ``x`` [..., dim] scaled by ``weight`` [dim] (one call)."""
    library = _library()
    dim = weight.shape[0]
    _require(x.dtype == weight.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous()
             and x.shape[-1] == dim, f"kernel_rms_norm takes contiguous float32 rows of {dim}, got {x.dtype} "
                                     f"{tuple(x.shape)}")
    out = torch.empty_like(x)
    library.chatloop_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
    return out


def kernel_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, offset: int, heads: int,
                 head_dim: int) -> None:
    """Rotary embeddings in place on ``heads`` vectors of ``head_dim`` from column ``offset`` of each row of a
    contiguous float32 ``x`` [..., width] (a fused q/k/v output); ``cos``, ``signed_sin`` [..., head_dim] (one
    row per row of ``x``), as :func:`chatloop.models.llama.rotate`."""
    library = _library()
    width = x.shape[-1]
    rows = x.numel() // width
    _require(x.dtype == cos.dtype == signed_sin.dtype == torch.float32 and x.is_contiguous()
             and cos.is_contiguous() and signed_sin.is_contiguous() and cos.numel() == rows * head_dim
             and signed_sin.numel() == rows * head_dim and offset >= 0 and offset + heads * head_dim <= width,
             f"kernel_rope_: x [{rows}, {width}], cos and sin [{rows}, {head_dim}] contiguous float32 needed, "
             f"got {tuple(x.shape)}, {tuple(cos.shape)}, {tuple(signed_sin.shape)}")
    library.chatloop_rope(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), rows, width, offset, heads, head_dim)


def stream_read(t: torch.Tensor) -> float:
    """Read a contiguous float32 tensor (numel a multiple of 4096) the way the kernel reads weights."""
    library = _library()
    _require(t.dtype == torch.float32 and t.is_contiguous() and t.numel() % 4096 == 0,
             "stream_read takes a contiguous float32 tensor of a multiple of 4096 elements, "
             f"got {t.dtype} {tuple(t.shape)}")
    return library.chatloop_stream_read(t.data_ptr(), t.numel(), torch.get_num_threads())
