"""GGUF's tensor types as ChatLoop keeps them: each one's block (weights and bytes) and a torch dequantizer.

A matrix [out, in] of type ``fmt`` is a uint8 tensor [out, in / block * block bytes], each row its blocks in order,
as the GGUF file stores it. The layouts (ggml-common.h; ``QK_K = 256`` weights a k-quant super-block):

- ``q4_0`` / ``q4_1`` / ``q8_0``: see :mod:`~chatloop.quant.formats`.
- ``q5_0`` (22 bytes / 32): float16 ``d``, 4 bytes of fifth bits (bit j: weight j), 16 bytes of nibbles (byte j:
  weight j low, j + 16 high); ``w = d * (q - 16)``. ``q5_1`` (24 / 32): ``d``, ``m`` then the same; ``w = d q + m``.
- ``q2_k`` (84 / 256): 16 bytes of 4-bit scale and min per 16 weights, 64 bytes of 2-bit quants, float16 ``d`` and
  ``dmin``; ``w = d sc q - dmin m``.
- ``q3_k`` (110 / 256): 32 bytes of high bits (set: no -4 offset), 64 bytes of 2-bit quants, 12 bytes of 6-bit
  scales (offset 32), float16 ``d``.
- ``q4_k`` (144 / 256) and ``q5_k`` (176 / 256): float16 ``d``, ``dmin``, 12 bytes of eight 6-bit scales and mins
  (one per 32 weights), [``q5_k``: 32 bytes of fifth bits], 128 bytes of nibbles; ``w = d sc q - dmin m``.
- ``q6_k`` (210 / 256): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, float16 ``d``;
  ``w = d sc (q - 32)``.
- ``f16`` / ``bf16``: one weight of 2 bytes a "block".

:func:`dequantize_blocks` computes in float32 in the order gguf-py's ``gguf.quants.dequantize`` does, so that the
two agree bit for bit (the tests hold them to it).
"""

from __future__ import annotations

import torch

__all__ = ["GGUF_TYPES", "QK_K", "block_of", "dequantize_blocks", "quantize_activations_q8_0",
           "quantize_activations_q8_k", "reference_decode_linear", "reference_kquant_linear", "row_bytes"]

QK_K = 256
GGUF_TYPES: dict[str, tuple[int, int]] = {
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (QK_K, 84), "q3_k": (QK_K, 110), "q4_k": (QK_K, 144), "q5_k": (QK_K, 176), "q6_k": (QK_K, 210),
    "f16": (1, 2), "bf16": (1, 2),
}
"""Every type a partition may keep: name -> (weights a block, bytes a block)."""


def block_of(fmt: str) -> tuple[int, int]:
    """(weights, bytes) of one block of ``fmt``."""
    if fmt not in GGUF_TYPES:
        raise ValueError(f"unknown quantization format {fmt!r}: one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[fmt]


def row_bytes(fmt: str, in_features: int) -> int:
    """The bytes of one row of ``in_features`` weights as ``fmt``."""
    weights, nbytes = block_of(fmt)
    if in_features % weights:
        raise ValueError(f"a row of {in_features} weights cannot be cut into {fmt} blocks of {weights}")
    return in_features // weights * nbytes


def _f16(field: torch.Tensor) -> torch.Tensor:
    """A float16 field [n, 2] of bytes as float32 [n, 1]."""
    return field.contiguous().view(torch.float16).float()


def _shift(values: torch.Tensor, shifts: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """``values >> shifts`` with ``shifts`` broadcast along ``shape`` (gguf-py's unpacking idiom)."""
    return values >> torch.tensor(shifts, dtype=values.dtype).reshape(shape)


def _nibbles(qs: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Nibble bytes [n, groups * width] as [n, groups, 2, width]: low nibbles, then high."""
    return _shift(qs.reshape(n, -1, 1, width), [0, 4], (1, 1, 2, 1)) & 0x0F


def _fifth_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """``q5_0``/``q5_1``'s 4 bytes of fifth bits [n, 4] as [n, 32] (bit j of the little-endian word: weight j)."""
    word = qh.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((word >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.uint8)


def _k_scale_min(scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q4_k``/``q5_k``'s 12 bytes of eight 6-bit scales and mins, as float32 [n, 8] each."""
    rows = scales.reshape(n, 3, 4)
    d, m, m_d = rows[:, 0], rows[:, 1], rows[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], -1)
    return sc.float(), mn.float()


def _dequantize(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """Blocks [n, bytes] as float32 [n, weights]."""
    n = blocks.shape[0]
    if fmt == "f16":
        return _f16(blocks)
    if fmt == "bf16":
        return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    if fmt == "q8_0":
        return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks[:, :2])
    if fmt in ("q4_0", "q4_1"):
        d, start = _f16(blocks[:, :2]), 2 if fmt == "q4_0" else 4
        q = _nibbles(blocks[:, start:], n, 16).reshape(n, 32)
        if fmt == "q4_0":
            return d * (q.to(torch.int8) - 8).float()
        return d * q.float() + _f16(blocks[:, 2:4])
    if fmt in ("q5_0", "q5_1"):
        d, start = _f16(blocks[:, :2]), 2 if fmt == "q5_0" else 4
        high = _fifth_bits(blocks[:, start : start + 4], n)
        q = _nibbles(blocks[:, start + 4 :], n, 16).reshape(n, 32) | (high << 4)
        if fmt == "q5_0":
            return d * (q.to(torch.int8) - 16).float()
        return d * q.float() + _f16(blocks[:, 2:4])
    if fmt == "q2_k":
        scales, qs = blocks[:, :16], blocks[:, 16:80]
        d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
        ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
        q = (_shift(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(n, 16, 16).float()
        return (dl * q - ml).reshape(n, QK_K)
    if fmt == "q3_k":
        hmask, qs, packed, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
        low = _shift(packed[:, :8].reshape(n, 1, 8), [0, 4], (1, 2, 1)).reshape(n, 16)
        high = _shift(packed[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6], (1, 4, 1)).reshape(n, 16)
        scales = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
        dl = (d * scales.float()).reshape(n, 16, 1)
        ql = _shift(qs.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)).reshape(n, 16, 16) & 3
        qh = (_shift(hmask.reshape(n, -1, 1, 32), list(range(8)), (1, 1, 8, 1)).reshape(n, 16, 16) & 1) ^ 1
        q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
        return (dl * q).reshape(n, QK_K)
    if fmt in ("q4_k", "q5_k"):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scale_min(blocks[:, 4:16], n)
        scale = (d * sc).reshape(n, -1, 1)
        offset = (dmin * mn).reshape(n, -1, 1)
        if fmt == "q4_k":
            q = _nibbles(blocks[:, 16:], n, 32).reshape(n, -1, 32).float()
        else:
            ql = _nibbles(blocks[:, 48:], n, 32).reshape(n, -1, 32)
            qh = (_shift(blocks[:, 16:48].reshape(n, -1, 1, 32), list(range(8)), (1, 1, 8, 1)) & 1).reshape(n, -1, 32)
            q = (ql | (qh << 4)).float()
        return (scale * q - offset).reshape(n, QK_K)
    if fmt == "q6_k":
        ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], _f16(blocks[:, 208:210])
        scale = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
        low = _nibbles(ql, n, 64).reshape(n, -1, 32)
        high = (_shift(qh.reshape(n, -1, 1, 32), [0, 2, 4, 6], (1, 1, 4, 1)) & 3).reshape(n, -1, 32)
        q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        return (scale * q).reshape(n, QK_K)
    raise AssertionError(fmt)


def dequantize_blocks(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 matrix [out, in] that ``data`` [out, bytes] (uint8, rows of ``fmt`` blocks) stands for."""
    weights, nbytes = block_of(fmt)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] % nbytes:
        raise ValueError(f"a {fmt} matrix is uint8 [out, a multiple of {nbytes} bytes], got {data.dtype} "
                         f"{tuple(data.shape)}")
    out = data.shape[0]
    blocks = data.reshape(-1, nbytes)
    return _dequantize(blocks, fmt).reshape(out, data.shape[1] // nbytes * weights)


def quantize_activations_q8_0(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [rows, in] as llama.cpp's Q8_0 (and Q8_1, whose ``s`` is ``d`` times the sum of ``q``) quantizes
    them, and so the decode kernels: int8 ``q`` [rows, in / block, block] and float32 scales ``d = amax / 127``
    [rows, in / block]; ties round to even. ``block`` 256 is Q8_K's ``q`` and ``d``."""
    blocks = x.float().reshape(x.shape[0], -1, block)
    d = blocks.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, blocks * (1 / torch.where(d > 0, d, 1))[..., None], 0).round().to(torch.int8)
    return q, d


def quantize_activations_q8_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [rows, in] as the k-quant kernel quantizes them (llama.cpp's Q8_K, symmetric): int8 ``q``
    [rows, in / 256, 256] and float32 scales ``d = amax / 127`` [rows, in / 256]; ties round to even."""
    return quantize_activations_q8_0(x, QK_K)


def reference_kquant_linear(x: torch.Tensor, data: torch.Tensor, fmt: str,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` as the k-quant kernel computes it (Q8_K activations, the weights as ``fmt`` blocks), in
    float64: what every path of kquant.c must give up to the order of its float additions."""
    rows = x.reshape(-1, x.shape[-1])
    q, d = quantize_activations_q8_k(rows)
    weight = dequantize_blocks(data, fmt).double().reshape(data.shape[0], -1, QK_K)
    y = torch.einsum("bkj,okj->bok", q.double(), weight)
    y = (y * d.double()[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], data.shape[0])


def reference_decode_linear(x: torch.Tensor, data: torch.Tensor, fmt: str,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` as the decode kernels compute it for ``fmt``, in float64: the k-quants as
    :func:`reference_kquant_linear` (Q8_K activations), ``q5_0`` and ``q5_1`` on Q8_0 activations (blocks of 32),
    ``f16`` and ``bf16`` on the float32 activations themselves."""
    if fmt.endswith("_k"):
        return reference_kquant_linear(x, data, fmt, bias)
    rows = x.reshape(-1, x.shape[-1])
    weight = dequantize_blocks(data, fmt).double()
    if fmt in ("f16", "bf16"):
        y = rows.double() @ weight.T
    else:
        q, d = quantize_activations_q8_0(rows)
        y = torch.einsum("bkj,okj->bok", q.double(), weight.reshape(data.shape[0], -1, 32))
        y = (y * d.double()[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], data.shape[0])
