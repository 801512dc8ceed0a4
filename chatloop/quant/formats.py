"""Weight-only quantization formats: GGUF's blocks of 32 weights, stored as they are in a GGUF file.

- ``q8_0``: 34 bytes a block: a float16 scale ``d``, then 32 int8 ``q``; ``w = d * q`` (8.5 bits a weight).
- ``q4_1``: 20 bytes a block: float16 ``d`` and ``m``, then 16 bytes of 4-bit ``q`` (byte j holds weight j in its
  low nibble and weight j + 16 in its high one); ``w = d * q + m`` (5 bits a weight).
- ``q4_0`` (read from GGUF files only): float16 ``d``, then the same 16 bytes; ``w = d * (q - 8)``. It is
  rewritten as ``q4_1`` with ``m = -8 d`` when loaded: the same weights, one kernel fewer.

A quantized matrix [out, in] is a uint8 tensor [out, in / 32 * block bytes]: each row its blocks in order, so a
row of a GGUF tensor is a row here. ``in`` must be a multiple of 32. GGUF's other types (``q5_0``, the k-quants,
``f16``...) are kept the same way: :mod:`~chatloop.quant.blocks`; :func:`in_features_of` and :func:`dequantize` take
them all.

The matmul kernels quantize the activations too, each block of 32 to int8 with a float scale (llama.cpp's
``q8_1``), and multiply in integers. :func:`reference_linear` is that arithmetic in torch, the tests' reference.
"""

from __future__ import annotations

import torch

from ..kernels import BLOCK_BYTES
from .blocks import GGUF_TYPES, dequantize_blocks

__all__ = ["BLOCK", "BLOCK_BYTES", "FORMATS", "dequantize", "in_features_of", "q4_0_as_q4_1", "quantize",
           "quantize_activations", "reference_linear"]

BLOCK = 32
FORMATS = ("q8_0", "q4_1")
"""What a loaded stage computes with (``q4_0`` becomes ``q4_1``)."""


def _check(fmt: str) -> None:
    if fmt not in BLOCK_BYTES:
        raise ValueError(f"unknown quantization format {fmt!r}: one of {', '.join(BLOCK_BYTES)}")


def in_features_of(data: torch.Tensor, fmt: str) -> int:
    """The number of input features of a quantized matrix ``data`` [out, bytes] (any type of ``GGUF_TYPES``)."""
    if fmt not in GGUF_TYPES:
        raise ValueError(f"unknown quantization format {fmt!r}: one of {', '.join(GGUF_TYPES)}")
    weights, nbytes = GGUF_TYPES[fmt]
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % nbytes:
        raise ValueError(f"a {fmt} matrix is uint8 [out, a multiple of {nbytes} bytes], got "
                         f"{data.dtype} {tuple(data.shape)}")
    return data.shape[1] // nbytes * weights


def _f16(values: torch.Tensor) -> torch.Tensor:
    """float16 values as their 2 bytes each, [..., 2] uint8."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` [out, in] (floating; ``in`` a multiple of 32) as ``fmt`` blocks, [out, in / 32 * bytes] uint8.

    Rounds to nearest (as llama.cpp's reference quantizers); computed in float32, one matrix at a time.
    """
    _check(fmt)
    if fmt == "q4_0":
        raise ValueError("q4_0 is read from GGUF files, not written: quantize to q4_1")
    out_features, in_features = weight.shape
    if in_features % BLOCK:
        raise ValueError(f"a matrix with {in_features} input features cannot be cut into blocks of {BLOCK}")
    blocks = weight.detach().float().reshape(out_features, in_features // BLOCK, BLOCK)
    if fmt == "q8_0":
        d = blocks.abs().amax(-1) / 127
        d = d.to(torch.float16).float()  # the scale as stored: quantize against it
        q = torch.where(d[..., None] > 0, blocks / d[..., None], 0).round().clamp(-127, 127).to(torch.int8)
        packed = torch.cat([_f16(d), q.view(torch.uint8)], -1)
    else:
        low, high = blocks.amin(-1), blocks.amax(-1)
        d = ((high - low) / 15).to(torch.float16).float()
        m = low.to(torch.float16).float()
        q = torch.where(d[..., None] > 0, (blocks - m[..., None]) / d[..., None], 0).round().clamp(0, 15)
        q = q.to(torch.uint8)
        nibbles = q[..., :16] | (q[..., 16:] << 4)
        packed = torch.cat([_f16(d), _f16(m), nibbles], -1)
    return packed.reshape(out_features, -1).contiguous()


def _split(data: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    """The fields of each block: [out, blocks, ...]."""
    blocks = data.reshape(data.shape[0], -1, BLOCK_BYTES[fmt])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
    if fmt == "q8_0":
        return d, blocks[..., 2:].contiguous().view(torch.int8)
    if fmt == "q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        nibbles = blocks[..., 4:]
    else:
        m, nibbles = -8 * d, blocks[..., 2:]
    return d, m, torch.cat([nibbles & 0x0F, nibbles >> 4], -1)


def dequantize(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 matrix [out, in] a quantized ``data`` stands for (any type of ``GGUF_TYPES``)."""
    in_features_of(data, fmt)
    if fmt not in ("q8_0", "q4_1"):
        return dequantize_blocks(data, fmt)
    if fmt == "q8_0":
        d, q = _split(data, fmt)
        return (d[..., None] * q.float()).reshape(data.shape[0], -1)
    d, m, q = _split(data, fmt)
    return (d[..., None] * q.float() + m[..., None]).reshape(data.shape[0], -1)


def q4_0_as_q4_1(data: torch.Tensor) -> torch.Tensor:
    """``q4_0`` blocks rewritten as ``q4_1`` (``m = -8 d``): the same weights, 2 bytes more a block."""
    in_features_of(data, "q4_0")
    blocks = data.reshape(data.shape[0], -1, BLOCK_BYTES["q4_0"])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    m = (-8 * d.float()).to(torch.float16)
    rewritten = torch.cat([blocks[..., 0:2], _f16(m), blocks[..., 2:]], -1)
    return rewritten.reshape(data.shape[0], -1).contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [rows, in] as the kernels quantize them: int8 ``q`` [rows, blocks, 32], float32 scales ``d``
    and ``s = d * sum(q)`` [rows, blocks]. Rounding: to nearest, ties to even."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, blocks * (1 / torch.where(d > 0, d, 1))[..., None], 0).round().to(torch.int8)
    return q, d, d * q.float().sum(-1)


def reference_linear(x: torch.Tensor, data: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a quantized ``W`` computed as the kernels compute it (activations in int8 blocks,
    integer products, float32 scales), in float64: what every kernel path must give up to rounding."""
    rows = x.reshape(-1, x.shape[-1])
    q, dx, sx = quantize_activations(rows)
    if fmt == "q8_0":
        dw, qw = _split(data, fmt)
        products = torch.einsum("bkj,okj->bok", q.double(), qw.double())
        y = (products * dx.double()[:, None, :] * dw.double()[None]).sum(-1)
    else:
        dw, mw, qw = _split(data, fmt)
        products = torch.einsum("bkj,okj->bok", q.double(), qw.double())
        y = (products * dx.double()[:, None, :] * dw.double()[None]).sum(-1) + sx.double() @ mw.double().T
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], data.shape[0])
