"""Linear weights reordered once, at load time, into oneDNN's blocked layout.

This is the reorder torch.compile's freezing does, without compiling. A decode step's
matmuls have 1-16 rows: on the 2-core AVX2 host MKL read a plain [out, in] float32 weight at
10-18 GB/s there, oneDNN's packed copy at 20-30 GB/s (a TinyLlama-1.1B layer: 1.5x faster
at 1 row, 2-2.8x at 4-16 rows), while a 1024-token prefill got ~15% slower. float32 only:
oneDNN packs bfloat16 weights only on CPUs with AVX-512.
"""

from __future__ import annotations

import torch
from torch import nn

from .stage import Stage

__all__ = ["PackedLinear", "can_pack", "pack_linear_weights"]


def can_pack(dtype: torch.dtype) -> bool:
    """Whether this torch build and dtype support packed linear weights."""
    return (
        dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


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


def _as_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a linear layer, whatever layout it stores; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    as_linear = getattr(module, "as_linear", None)
    return as_linear() if as_linear is not None else None


def pack_linear_weights(stage: Stage) -> int:
    """Replace every linear layer of ``stage`` (and a tied head) by a :class:`PackedLinear`.

    Returns how many were packed: 0 when the stage's dtype cannot be packed. The plain
    weights are released one by one, so packing needs one extra matrix of memory at a time.
    A last stage whose head is tied to the token embedding gets a packed copy of it; when the
    stage does not embed tokens too, the embedding is dropped.
    """
    dtype = next(stage.parameters()).dtype
    if not can_pack(dtype):
        return 0
    # Names, not modules: a list of modules would keep every plain weight alive until the end.
    names = [name for name, module in stage.named_modules() if _as_linear(module) is not None]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = stage.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(*_as_linear(getattr(parent, child))))
    packed = len(names)
    if stage.is_last and stage.lm_head is None:
        embedding = stage.get_submodule(stage.embedding_path)
        stage.lm_head = PackedLinear(embedding.weight)
        if not stage.is_first:
            parent_name, _, child = stage.embedding_path.rpartition(".")
            delattr(stage.get_submodule(parent_name), child)
        packed += 1
    return packed
