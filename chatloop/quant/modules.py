"""Linear and embedding layers over quantized weights (see :mod:`~chatloop.quant.formats`).

The weight stays quantized in memory (a uint8 buffer named ``weight``, so a partition's tensor loads into it by
name). :class:`QuantLinear` multiplies up to ``KERNEL_ROWS`` rows (decode steps) on ChatLoop's quantized kernel,
which streams the quantized bytes once; more rows (prefill) are compute-bound, and there it dequantizes a slice
of the weight at a time into torch's GEMM (float32 activations: a little more accurate than the kernel). Where
the kernel cannot be built, every call takes that second way. GGUF's other types (:mod:`~chatloop.quant.blocks`)
decode on kernels of their own: the k-quants on ``kquant.c`` (activations quantized to Q8_K), ``q5_0``, ``q5_1``,
``f16`` and ``bf16`` on ``ggufgemv.c`` (Q8_0 / Q8_1 activations; float32 for the half types); their prefill
dequantizes in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    FORMAT_IDS,
    GGUF_FORMAT_IDS,
    ISAS,
    KQUANT_FORMAT_IDS,
    TILED,
    gguf_linear_unchecked,
    kernel_dequantize_rows,
    kernel_interleave,
    kernel_kquant_interleave,
    kernel_kquant_rows,
    kquant_linear_unchecked,
    load_quant_kernels,
    quant_isa,
    quant_linear_unchecked,
)
from .blocks import GGUF_TYPES
from .formats import dequantize, in_features_of

__all__ = ["QuantEmbedding", "QuantLinear", "interleave_for_kernel", "quantize_modules", "tie_quantized_head"]

KERNEL_ROWS = 16
"""Up to this many input rows go to the quantized kernel; more to dequantize-and-GEMM."""
SLICE_ROWS = 1024
"""Weight rows dequantized at once for a GEMM (1024 x 4096 float32: 16 MiB)."""


class QuantLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` [out, in] held as ``fmt`` blocks in ``weight`` [out, bytes] (uint8)."""

    def __init__(self, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.in_features = in_features_of(weight, fmt) if weight.device.type != "meta" else 0
        self.out_features = weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:  # a module built on meta learns its input size from the real weight
            self.in_features = in_features_of(state_dict[prefix + "weight"], self.fmt)
            self.weight = self.weight.contiguous()
            if self.bias is not None:
                self.bias = self.bias.float().contiguous()

    def decodes_on_kernel(self) -> bool:
        """Decode steps (up to ``KERNEL_ROWS`` rows) run on the quantized kernel here: it could be built and it
        reads this layer's format."""
        return self.fmt in FORMAT_IDS and load_quant_kernels() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        kernels = self.decodes_on_kernel()
        if kernels and x.numel() <= KERNEL_ROWS * self.in_features:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{self}: got {x.shape[-1]} input features")
            return quant_linear_unchecked(x.contiguous(), self.weight, FORMAT_IDS[self.fmt], self.in_features,
                                          self.bias, ISAS[quant_isa()][0])
        if x.numel() <= KERNEL_ROWS * self.in_features and load_quant_kernels() is not None:
            unchecked = (kquant_linear_unchecked if self.fmt in KQUANT_FORMAT_IDS
                         else gguf_linear_unchecked if self.fmt in GGUF_FORMAT_IDS else None)
            if unchecked is not None:
                if x.shape[-1] != self.in_features:
                    raise ValueError(f"{self}: got {x.shape[-1]} input features")
                return unchecked(x.contiguous(), self.weight, self.fmt, self.in_features, self.bias,
                                 ISAS[quant_isa()][0])
        outputs = []
        for start in range(0, self.out_features, SLICE_ROWS):
            rows = torch.arange(start, min(start + SLICE_ROWS, self.out_features))
            if self.fmt.endswith("_x16") and self.fmt.removesuffix("_x16") in TILED:  # the kernel's tiles, to rows
                weight = dequantize(kernel_kquant_rows(self.weight, rows, self.fmt), self.fmt.removesuffix("_x16"))
            elif kernels:
                weight = kernel_dequantize_rows(self.weight, rows, self.fmt, self.in_features)
            else:
                weight = dequantize(self.weight[rows], self.fmt)
            outputs.append(F.linear(x, weight))
        y = torch.cat(outputs, -1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Rows of an embedding table [vocab, dim] held as ``fmt`` blocks, dequantized as they are looked up."""

    def __init__(self, weight: torch.Tensor, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        self.embedding_dim = in_features_of(weight, fmt) if weight.device.type != "meta" else 0
        self.register_buffer("weight", weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:
            self.embedding_dim = in_features_of(state_dict[prefix + "weight"], self.fmt)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fmt in FORMAT_IDS and load_quant_kernels() is not None:
            return kernel_dequantize_rows(self.weight, ids, self.fmt, self.embedding_dim)
        return dequantize(self.weight[ids.reshape(-1)], self.fmt).reshape(*ids.shape, self.embedding_dim)

    def tied_head(self) -> QuantLinear:
        """A tied head over the same bytes."""
        head = QuantLinear(self.weight, self.fmt)
        head.in_features = self.embedding_dim
        return head


def quantize_modules(stage: nn.Module, formats: dict[str, str], state: dict[str, torch.Tensor]) -> None:
    """Before ``stage`` (built on the meta device) loads ``state``: make the linear and embedding layers whose
    weights ``formats`` names ({"model.layers.0.mlp.up_proj.weight": "q4_1", ...}) quantized ones."""
    for key, fmt in formats.items():
        if fmt not in GGUF_TYPES:
            raise ValueError(f"tensor {key} is in format {fmt!r}; this ChatLoop computes with {', '.join(GGUF_TYPES)}")
        name, _, leaf = key.rpartition(".")
        if leaf != "weight" or key not in state:
            raise ValueError(f"quantized tensor {key} is not a weight of this stage")
        in_features_of(state[key], fmt)  # checks the bytes' shape
        parent_name, _, child = name.rpartition(".")
        parent = stage.get_submodule(parent_name) if parent_name else stage
        module = getattr(parent, child)
        if isinstance(module, nn.Linear):
            bias = None if module.bias is None else torch.empty_like(module.bias, device="meta")
            replacement: nn.Module = QuantLinear(torch.empty_like(state[key], device="meta"), fmt, bias)
        elif isinstance(module, nn.Embedding):
            replacement = QuantEmbedding(torch.empty_like(state[key], device="meta"), fmt)
        else:
            raise ValueError(f"quantized tensor {key} belongs to a {type(module).__name__}, not a linear layer")
        setattr(parent, child, replacement)


def tie_quantized_head(stage) -> None:
    """A last stage whose head is tied to a quantized embedding reads the same bytes; a last stage that does not
    embed tokens too keeps only the head."""
    if not stage.is_last or stage.lm_head is not None:
        return
    parent_name, _, child = stage.embedding_path.rpartition(".")
    embedding = getattr(stage.get_submodule(parent_name), child, None)
    if isinstance(embedding, QuantEmbedding):
        stage.lm_head = embedding.tied_head()
        if not stage.is_first:
            delattr(stage.get_submodule(parent_name), child)


def interleave_for_kernel(stage: nn.Module) -> int:
    """Where the quantized kernel runs on VNNI, give ``stage``'s linear layers (of a multiple of 16 rows) the layout
    it computes 16 rows at a time in (``q4_1_x16``, ``q8_0_x16``: see qgemv.c; ``q4_k_x16``, ``q5_k_x16``,
    ``q6_k_x16``: kquant.c; ``q5_0_x16``, ``q5_1_x16``: ggufgemv.c); how many were changed. The same number of bytes,
    rearranged in place: a head tied to the embedding gets its own, the embedding keeps GGUF's layout."""
    if load_quant_kernels() is None or quant_isa() != "avx512_vnni":
        return 0
    embedded = {m.weight.data_ptr() for m in stage.modules() if isinstance(m, QuantEmbedding)}
    changed = 0
    for module in stage.modules():
        if isinstance(module, QuantLinear) and module.fmt in ("q4_1", "q8_0", *TILED) \
                and module.out_features % 16 == 0:
            shared = module.weight.data_ptr() in embedded
            interleave = kernel_kquant_interleave if module.fmt in TILED else kernel_interleave
            module.weight, module.fmt = interleave(module.weight, module.fmt, in_place=not shared)
            changed += 1
    return changed
