"""A sparse MLP's chosen experts in one native call (``experts.c``), for :class:`chatloop.models.moe.SparseMoE`.

``experts.c`` is a library of its own, built like the quantized one (no ``-march=native``: it has no SIMD of its
own) and handed that library's ``*_linear_shared`` functions, which pick their SIMD path at run time
(:func:`~chatloop.kernels.quant_isa`). It loads wherever the quantized kernels do.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from . import (
    BLOCK_BYTES,
    GGUF_ROW_BYTES,
    ISAS,
    KQUANT_BLOCK_BYTES,
    QUANT_FLAGS,
    _build,
    _require,
    available_isas,
    fused_format,
    load_quant_kernels,
    quant_isa,
)

__all__ = ["HUGE_PAGE", "MoEKernels", "huge_page_block", "kernel_moe_experts", "load_expert_kernels",
           "moe_experts_unchecked", "move_to_huge_pages", "release_freed_memory", "shared_experts_entry"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "experts.c"
_FAMILY_FUNCTIONS = ("chatloop_quant_linear", "chatloop_kquant_linear", "chatloop_gguf_linear")
"""The quantized library's entry point for each format family of :func:`~chatloop.kernels.fused_format`."""


HUGE_PAGE = 2 << 20
"""A transparent huge page on x86-64 and most arm64 kernels: 2 MiB."""
_MADV_HUGEPAGE = 14
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _madvise_huge(address: int, length: int) -> str | None:
    """``madvise(address, length, MADV_HUGEPAGE)``: None where it took, else why not."""
    try:
        mode = _THP_MODE.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return f"{_THP_MODE} cannot be read"
    if mode == "never":
        return f"transparent huge pages are off ({_THP_MODE}: never)"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(address, length, _MADV_HUGEPAGE) != 0:
        return f"madvise(MADV_HUGEPAGE) failed: {os.strerror(ctypes.get_errno())}"
    return None


def huge_page_block(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``nbytes`` that starts on a 2 MiB boundary and that the kernel is asked to
    back with transparent huge pages (``MADV_HUGEPAGE``, before any page is touched). The Q4_K kernel streams a
    layer's experts at ~28-30 GB/s from 2 MiB pages against ~20 from 4 KiB ones (docs/performance.md, MoE); torch
    asks for huge pages only for allocations of 2 MiB or more, and an expert's matrices are smaller. Where huge pages
    are unavailable the block is still aligned, on ordinary pages, and a log line says why."""
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    raw = torch.empty(length + HUGE_PAGE, dtype=torch.uint8)  # the view below keeps it alive
    start = -raw.data_ptr() % HUGE_PAGE
    block = raw[start : start + length]
    if length and (why := _madvise_huge(block.data_ptr(), length)) is not None:
        log.info("MoE experts on ordinary pages: %s", why)
    return block[:nbytes]


def move_to_huge_pages(modules: Sequence[torch.nn.Module]) -> None:
    """Copy the ``weight`` of each of ``modules`` (in order, each on a cache line of its own) into one
    :func:`huge_page_block`, each module's weight becoming a view of it, and hand the separate copies back to the
    system. The bytes are the same, so every output is; the kernels read them faster from 2 MiB pages."""
    sizes = [-(-m.weight.numel() // 64) * 64 for m in modules]
    offset = 0
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the caller runs in
        block = huge_page_block(sum(sizes))
        for module, size in zip(modules, sizes):
            weight = module.weight
            view = block[offset : offset + weight.numel()].view(weight.shape)
            view.copy_(weight)
            module.weight = view  # the old copy goes with its last reference
            offset += size
            del weight
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``): matrices of a few MiB freed from the
    middle of the heap otherwise stay resident. Nothing where libc has no ``malloc_trim``."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


class MoEKernels(ctypes.Structure):
    """``chatloop_moe_kernels`` in experts.c: the quantized library's linear function of each format family and
    the SIMD path they take."""

    _fields_ = [("linear", ctypes.c_void_p * 3), ("isa", ctypes.c_int64)]


@functools.cache
def load_expert_kernels() -> ctypes.CDLL | None:
    """experts.c's library, or None (logged once) where the quantized kernels are off or it cannot be built: the
    experts then run through their modules."""
    if load_quant_kernels() is None:
        return None
    try:
        library = ctypes.CDLL(str(_build(os.environ.get("CC", "cc"), [SOURCE], QUANT_FLAGS,
                                         "chatloop_expert_kernels", ("-lm",))))
    except subprocess.CalledProcessError as e:
        log.info("ChatLoop's expert kernel is off (the C compiler failed: %s)", e.stderr.strip()[:300])
        return None
    except (OSError, subprocess.SubprocessError) as e:
        log.info("ChatLoop's expert kernel is off (%s)", e)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.chatloop_moe_scratch.argtypes = [size] * 5
    library.chatloop_moe_scratch.restype = size
    library.chatloop_moe_experts.argtypes = ([pointer, pointer, size, size, size, pointer, pointer] + [size] * 4
                                             + [pointer] * 3 + [size, pointer, ctypes.c_int, pointer])
    library.chatloop_moe_experts.restype = None
    return library


def _in_features(data: torch.Tensor, fmt: str) -> int:
    """Inputs of a matrix ``data`` [out, bytes] in a kernel's layout ``fmt`` (0 where its bytes do not divide)."""
    rows = fmt.removesuffix("_x16")
    if rows in BLOCK_BYTES:
        weights, nbytes = 32, BLOCK_BYTES[rows]
    elif fmt in KQUANT_BLOCK_BYTES:
        weights, nbytes = 256, KQUANT_BLOCK_BYTES[fmt]
    else:
        weights, nbytes = GGUF_ROW_BYTES[fmt]
    return data.shape[1] // nbytes * weights if data.shape[1] % nbytes == 0 else 0


@functools.cache
def _kernels(isa: str) -> MoEKernels:
    quant = load_quant_kernels()
    functions = [ctypes.cast(getattr(quant, name), ctypes.c_void_p).value for name in _FAMILY_FUNCTIONS]
    return MoEKernels((ctypes.c_void_p * 3)(*functions), ISAS[isa][0])


def moe_experts_unchecked(x: torch.Tensor, out: torch.Tensor, gate_up: Sequence[int], down: Sequence[int],
                          formats: tuple[int, int], row_bytes: tuple[int, int], counts: Sequence[int],
                          rows: torch.Tensor, weights: torch.Tensor, intermediate_size: int, isa: str) -> None:
    """:func:`kernel_moe_experts` without its checks, for a layer whose experts were checked: ``gate_up``, ``down``
    the chosen experts' weight addresses, ``formats`` theirs as :func:`~chatloop.kernels.fused_format` numbers
    them, ``row_bytes`` a row's bytes of each, ``counts`` [n] each expert's rows, ``rows`` and ``weights``
    [sum(counts)] contiguous int64 and float32."""
    hidden, n, threads = x.shape[-1], len(gate_up), torch.get_num_threads()
    library = load_expert_kernels()
    scratch = torch.empty(library.chatloop_moe_scratch(rows.numel(), max(counts), hidden, intermediate_size, threads),
                          dtype=torch.uint8)
    library.chatloop_moe_experts(
        x.data_ptr(), out.data_ptr(), hidden, intermediate_size, n, (ctypes.c_void_p * n)(*gate_up),
        (ctypes.c_void_p * n)(*down), *formats, *row_bytes, (ctypes.c_int64 * n)(*counts), rows.data_ptr(),
        weights.data_ptr(), max(counts), ctypes.byref(_kernels(isa)), threads, scratch.data_ptr())


def kernel_moe_experts(x: torch.Tensor, out: torch.Tensor, gate_up: Sequence[torch.Tensor],
                       down: Sequence[torch.Tensor], gate_up_fmt: str, down_fmt: str, counts: torch.Tensor,
                       rows: torch.Tensor, weights: torch.Tensor, isa: str | None = None) -> None:
    """``out[r] += weights[p] * down_e(SiLU(gate_e(x[r])) * up_e(x[r]))`` for each expert ``e`` (ascending: the
    order of ``gate_up``, ``down`` and ``counts``) and each of its ``counts[e]`` pairs ``p`` (row ``rows[p]``), in
    one native call, as :class:`~chatloop.models.moe.SparseMoE`'s modules compute it.

    ``x``, ``out`` contiguous float32 [N, C]; ``gate_up[e]`` the expert's gate and up projections merged (gate rows
    first) as ``gate_up_fmt`` blocks [2F, bytes], ``down[e]`` [C, bytes] in ``down_fmt``; ``rows`` int64 in [0, N),
    distinct within an expert; ``weights`` float32; ``isa`` a path of :func:`~chatloop.kernels.available_isas`
    (default :func:`~chatloop.kernels.quant_isa`)."""
    _require(load_expert_kernels() is not None, "ChatLoop's expert kernel is not available here (see the log)")
    _require(x.dtype == out.dtype == torch.float32 and x.dim() == out.dim() == 2 and x.shape == out.shape
             and x.is_contiguous() and out.is_contiguous(),
             f"kernel_moe_experts: x and out are contiguous float32 [N, C] alike, got {x.dtype} {tuple(x.shape)} "
             f"and {out.dtype} {tuple(out.shape)}")
    formats = fused_format(gate_up_fmt), fused_format(down_fmt)
    _require(None not in formats, f"kernel_moe_experts: no kernel for {gate_up_fmt!r} or {down_fmt!r}")
    n, (N, hidden) = len(gate_up), x.shape
    _require(n > 0 and len(down) == n and counts.shape == (n,) and counts.dtype == rows.dtype == torch.int64
             and weights.dtype == torch.float32 and rows.is_contiguous() and weights.is_contiguous()
             and counts.is_contiguous() and bool((counts > 0).all())
             and rows.shape == weights.shape == (int(counts.sum()),),
             "kernel_moe_experts: need n > 0 experts' gate_up and down, counts [n] (int64, > 0), rows (int64) and "
             "weights (float32) [sum(counts)], contiguous")
    _require(bool(((rows >= 0) & (rows < N)).all()), f"kernel_moe_experts: rows outside [0, {N})")
    width = None
    for up, dn in zip(gate_up, down):
        _require(up.dtype == dn.dtype == torch.uint8 and up.dim() == dn.dim() == 2 and up.is_contiguous()
                 and dn.is_contiguous(), "kernel_moe_experts: weights are contiguous uint8 [out, bytes]")
        _require(not gate_up_fmt.endswith("_x16") or up.shape[0] % 16 == 0,
                 f"kernel_moe_experts: a {gate_up_fmt} matrix has a multiple of 16 rows, got {up.shape[0]}")
        _require(not down_fmt.endswith("_x16") or dn.shape[0] % 16 == 0,
                 f"kernel_moe_experts: a {down_fmt} matrix has a multiple of 16 rows, got {dn.shape[0]}")
        _require(_in_features(up, gate_up_fmt) == hidden and up.shape[0] % 2 == 0
                 and dn.shape[0] == hidden and (width is None or up.shape[0] == 2 * width),
                 f"kernel_moe_experts: gate_up [2F, {hidden} inputs] and down [{hidden}, F inputs] of one F needed, "
                 f"got {tuple(up.shape)} and {tuple(dn.shape)}")
        width = up.shape[0] // 2
        _require(_in_features(dn, down_fmt) == width,
                 f"kernel_moe_experts: down takes {_in_features(dn, down_fmt)} inputs, gate_up gives {width}")
    isa = isa or quant_isa()
    _require(isa in available_isas(), f"kernel_moe_experts: this CPU cannot run the {isa!r} path")
    moe_experts_unchecked(x, out, [t.data_ptr() for t in gate_up], [t.data_ptr() for t in down], formats,
                          (gate_up[0].shape[1], down[0].shape[1]), counts.tolist(), rows, weights, width, isa)


def shared_experts_entry(isa: str) -> tuple[int, int]:
    """The address of ``chatloop_moe_experts_shared`` (experts.c: the experts' work shared by the threads of a
    caller's parallel region, as layers.c's one-call decode step calls it) and of the kernels struct it takes for
    the quantized path ``isa``; the struct lives as long as the process. The expert kernel must be loaded."""
    library = load_expert_kernels()
    return (ctypes.cast(library.chatloop_moe_experts_shared, ctypes.c_void_p).value,
            ctypes.addressof(_kernels(isa)))
