"""Linear layers prepared once, at load time, for decode steps' small matmuls.

A decode step multiplies 1-16 rows by every weight matrix, so it runs at the speed at which
the weights stream from memory. On the 2-core AVX2 host MKL read a plain [out, in] float32
weight at 10-18 GB/s there. Two ways to do better:

- :class:`KernelLinear`: ChatLoop's own kernel (``chatloop/kernels/gemv.c``; ``bf16gemv.c`` for
  bfloat16, up to 4 rows) on the plain weight for up to 16 rows, torch's GEMM above that (prefill, which
  so stays bit-equal to transformers). float32: 1.2-2.2x faster than oneDNN's packed GEMM on TinyLlama and
  SmolLM2 shapes, 33 GB/s at 1 row. Used where the kernel builds.
- :class:`PackedLinear`: the weight reordered into oneDNN's blocked layout, the reorder
  torch.compile's freezing does (1.5x over MKL at 1 row, 2-2.8x at 4-16 rows; a 1024-token
  prefill ~15% slower). The float32 fallback where no C compiler is available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    BF16_ISAS,
    BF16_KERNEL_ROWS,
    MAX_KERNEL_ROWS,
    available_bf16_isas,
    bf16_isa,
    bf16_linear_unchecked,
    kernel_linear,
    load_kernels,
)
from .stage_model import StageModel

__all__ = ["KernelLinear", "PackedLinear", "concat_linear", "fast_linear_for", "pack_linear_weights"]


def fast_linear_for(dtype: torch.dtype, use_kernel: bool = True) -> type[nn.Module] | None:
    """The fastest linear layer this machine has for ``dtype``, or None for torch's own."""
    if dtype == torch.bfloat16:  # the bfloat16 kernel where it has a SIMD path here (not portable C alone)
        return KernelLinear if use_kernel and len(available_bf16_isas()) > 1 else None
    if dtype != torch.float32:
        return None
    if use_kernel and load_kernels() is not None:
        return KernelLinear
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return PackedLinear
    return None


class PackedLinear(nn.Module):
    """``y = x @ weight.T + bias`` with ``weight`` [out, in] held only in oneDNN's layout.

    The packed weight is a plain attribute, not a parameter: a packed stage is for inference
    and has no state dict to save.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class KernelLinear(nn.Module):
    """``y = x @ weight.T + bias`` on ChatLoop's kernel for up to 16 rows, on torch's GEMM for more; float32 or
    bfloat16 (then ``x`` of the weight's dtype).

    ``weight`` [out, in] stays plain (one copy) but gets memory of its own, off the checkpoint's mapping.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().clone(memory_format=torch.contiguous_format)
        self.bias = None if bias is None else bias.detach().clone(memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.bfloat16:
            if x.numel() <= MAX_KERNEL_ROWS * self.in_features:
                return kernel_linear(x, self.weight, self.bias)
        elif x.numel() <= BF16_KERNEL_ROWS * self.in_features and x.dtype == torch.bfloat16 \
                and x.shape[-1] == self.in_features:
            return bf16_linear_unchecked(x.contiguous(), self.weight, self.bias, BF16_ISAS[bf16_isa()][0])
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _as_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a linear layer, whatever layout it stores; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    as_linear = getattr(module, "as_linear", None)
    return as_linear() if as_linear is not None else None


def pack_linear_weights(stage: StageModel, use_kernel: bool = True) -> int:
    """Replace every linear layer of ``stage`` (and a tied head) by a :class:`KernelLinear`.

    :class:`PackedLinear` instead where the kernel cannot be built or ``use_kernel`` is
    false. Returns how many were replaced: 0 when the stage's dtype cannot be packed. The plain
    weights are released one by one, so packing needs one extra matrix of memory at a time.
    A last stage whose head is tied to the token embedding gets a copy of it; when the
    stage does not embed tokens too, the embedding is dropped.
    """
    fast_linear = fast_linear_for(next(stage.parameters()).dtype, use_kernel)
    if fast_linear is None:
        return 0
    # Names, not modules: a list of modules would keep every plain weight alive until the end.
    names = [name for name, module in stage.named_modules() if _as_linear(module) is not None]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = stage.get_submodule(parent_name)
        setattr(parent, child, fast_linear(*_as_linear(getattr(parent, child))))
    packed = len(names)
    if stage.is_last and stage.lm_head is None:
        embedding = stage.get_submodule(stage.embedding_path)
        stage.lm_head = fast_linear(embedding.weight)
        if not stage.is_first:
            parent_name, _, child = stage.embedding_path.rpartition(".")
            delattr(stage.get_submodule(parent_name), child)
        packed += 1
    return packed


def concat_linear(modules: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``modules``' outputs side by side (their weights' rows stacked), or None where they are
    not all of one kind that can be stacked (plain, kernel or quantized with one format; oneDNN's packed layout
    cannot)."""
    from ..quant import QuantLinear

    kind = type(modules[0])
    if any(type(m) is not kind for m in modules) or kind not in (nn.Linear, KernelLinear, QuantLinear):
        return None
    if kind is QuantLinear and len({m.fmt for m in modules}) > 1:
        return None
    weight = torch.cat([m.weight.detach() for m in modules])
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        dtype = torch.float32 if kind is QuantLinear else weight.dtype
        bias = torch.cat([b.detach() if b is not None else torch.zeros(m.out_features, dtype=dtype)
                          for b, m in zip(biases, modules)])
    if kind is QuantLinear:
        merged = QuantLinear(weight, modules[0].fmt, bias)
        merged.in_features = modules[0].in_features
        return merged
    if kind is KernelLinear:
        return KernelLinear(weight, bias)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear
