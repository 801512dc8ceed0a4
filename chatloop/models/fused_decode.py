"""A float32 Llama (or Granite) stage's decode steps in one native call (``chatloop/kernels/layers.c``).

At batch 1 a decode step of SmolLM2 spent as long between its matmuls (torch ops, ctypes calls, Python) as in
them. Where every layer's matrices run on ChatLoop's kernels (float32 ``KernelLinear`` or ``QuantLinear`` in any
type a partition keeps: q8_0 / q4_1, the k-quants, q5_0 / q5_1, f16 / bf16, and their tiles) and the cache attends
in place, :class:`LlamaDecodeKernel` runs the step's layers with the same kernels in the same order, from C: one
call a step instead of ~20 a layer. q/k/v and gate/up are fused where their types agree, else passed as separate
matrices (a GGUF file's ``attn_v`` often has a type of its own). Each new token is a row of the step: a decode
step's one a sequence, a speculative verify step's several (:data:`~chatloop.models.kv_cache.IN_PLACE_MAX_TOKENS`),
padding left out. Prefill and other dtypes keep the modules' path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..kernels import (
    ISAS,
    LlamaLayerSpec,
    LlamaShapeSpec,
    MatrixSpec,
    fused_format,
    load_kernels,
    load_quant_kernels,
    quant_isa,
)
from ..quant import QuantLinear
from ..quant import modules as quant_modules
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .packing import KernelLinear

__all__ = ["LlamaDecodeKernel"]


def _matrix(module: nn.Module) -> MatrixSpec | None:
    """The kernel's view of a linear layer, or None where it is not on ChatLoop's kernels."""
    if isinstance(module, KernelLinear) and module.weight.dtype == torch.float32:
        fmt = -1
    elif isinstance(module, QuantLinear) and quant_modules.load_quant_kernels() is not None \
            and fused_format(module.fmt) is not None:  # (asked where QuantLinear asks: its decode steps' kernels)
        fmt = fused_format(module.fmt)
    else:
        return None
    bias = None if module.bias is None else module.bias.data_ptr()
    return MatrixSpec(fmt, module.weight.data_ptr(), bias, module.out_features, module.in_features)


def _parts(module: nn.Module, fused: tuple[str, ...], separate: tuple[str, ...]) -> list[nn.Module] | None:
    """A layer's projections the step runs side by side: the fused one, or the separate ones where their types kept
    them apart (:func:`~chatloop.models.packing.concat_linear`); None where it has neither."""
    for names in (fused, separate):
        if all(hasattr(module, name) for name in names):
            return [getattr(module, name) for name in names]
    return None


class LlamaDecodeKernel:
    """Runs a stage's decode steps through all its layers in one call; build it with :meth:`for_stage`."""

    def __init__(self, layers: list[LlamaLayerSpec], shape: LlamaShapeSpec, keep: list[torch.Tensor]) -> None:
        self.layers = (LlamaLayerSpec * len(layers))(*layers)
        self.shape = shape
        self._keep = keep  # the weights the specs point into stay alive with them
        self.quantized = any(m.format >= 0 for layer in layers
                             for m in (*layer.qkv, layer.o, *layer.gate_up, layer.down))

    @classmethod
    def for_stage(cls, stage) -> LlamaDecodeKernel | None:
        """The kernel for a loaded float32 :class:`~chatloop.models.llama.LlamaStage` (Granite's too: its
        attention scale and residual multiplier go into the shape) whose projections are on ChatLoop's kernels
        (fused, or of types that could not be) and whose norms and rotary run on its row kernels; None
        otherwise."""
        from .llama import LlamaStage

        if not isinstance(stage, LlamaStage) or not stage.single_call_decode or not stage.native_attention \
                or load_kernels() is None:
            return None
        layers, keep, scalars = [], [], set()
        for layer in stage.decoder_layers():
            attention, mlp = layer.self_attn, layer.mlp
            # what the modules scale by: Granite's layers scale residuals and attention, Llama's attend by 1/sqrt(D)
            scalars.add((attention.scale, getattr(layer, "residual_multiplier", 1.0)))
            if not (attention.native_rope and layer.input_layernorm.native and layer.post_attention_layernorm.native):
                return None
            qkv = _parts(attention, ("qkv_proj",), ("q_proj", "k_proj", "v_proj"))
            gate_up = _parts(mlp, ("gate_up_proj",), ("gate_proj", "up_proj"))
            if qkv is None or gate_up is None:
                return None
            modules = (*qkv, attention.o_proj, *gate_up, mlp.down_proj)
            matrices = [_matrix(m) for m in modules]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(m is None for m in matrices) or any(n.dtype != torch.float32 for n in norms):
                return None
            specs = iter(matrices)
            qkv_specs = [next(specs) for _ in qkv] + [MatrixSpec(-1, None, None, 0, 0)] * (3 - len(qkv))
            o = next(specs)
            gate_up_specs = [next(specs) for _ in gate_up] + [MatrixSpec(-1, None, None, 0, 0)] * (2 - len(gate_up))
            layers.append(LlamaLayerSpec((MatrixSpec * 3)(*qkv_specs), o, (MatrixSpec * 2)(*gate_up_specs),
                                         next(specs), *(n.data_ptr() for n in norms)))
            keep += [*norms, *(m.weight for m in modules)]
        if len(scalars) > 1:  # one spec a stage: layers that scale apart keep the modules' path
            return None
        a = stage.args
        quant = load_quant_kernels()

        def address(name: str) -> int | None:
            return ctypes.cast(getattr(quant, name), ctypes.c_void_p).value if quant else None

        shape = LlamaShapeSpec(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size,
                               a.norm_eps, address("chatloop_quant_linear_shared"), 0,
                               address("chatloop_kquant_linear_shared"), address("chatloop_gguf_linear_shared"))
        if layers:
            attention_scale, shape.residual_multiplier = scalars.pop()
            shape.attention_scale = 0.0 if attention_scale is None else attention_scale  # 0: 1/sqrt(D), as in C
        return cls(layers, shape, keep) if layers else None

    def __call__(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor,
                 signed_sin: torch.Tensor) -> torch.Tensor:
        """The hidden states [B, T, C] after the stage's layers, for a micro-batch the cache decodes in place
        (:attr:`PagedKVCache.decode_in_place`); writes the step's keys and values into ``cache``. Each new token
        is a row of the step (a verify step's tokens attend to each other through the cache); padding's rows come
        back as they went in."""
        library = load_kernels()
        B, T, hidden, head_dim = x.shape[0], x.shape[1], self.shape.hidden, self.shape.head_dim
        # Checked on every call, as the kernels' wrappers do: C reads what these shapes promise.
        if x.dim() != 3 or x.shape[2] != hidden or cos.numel() != B * T * head_dim \
                or signed_sin.numel() != B * T * head_dim:
            raise ValueError(f"the fused decode step takes hidden states [B, T, {hidden}] and rotary [B, T, 1, "
                             f"{head_dim}], got {tuple(x.shape)}, {tuple(cos.shape)}, {tuple(signed_sin.shape)}")
        if cache.keys.dtype != torch.float32 or not (cache.keys.is_contiguous() and cache.values.is_contiguous()):
            raise ValueError("the fused decode step needs a contiguous float32 KV cache")
        rows, slots, tables, lengths, max_length = cache.in_place_step()
        hidden_rows = x.float().reshape(B * T, hidden)
        cos, signed_sin = cos.reshape(B * T, head_dim), signed_sin.reshape(B * T, head_dim)
        if rows is None:
            out = hidden_rows.clone()  # updated in place
        else:  # padding left out
            out = hidden_rows.index_select(0, rows)
            cos, signed_sin = cos.index_select(0, rows), signed_sin.index_select(0, rows)
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
        R = out.shape[0]
        if slots.shape != (R,) or tables.shape[0] != R or lengths.shape != (R,):
            raise ValueError(f"the fused decode step got {R} new tokens but cache slots for {tuple(slots.shape)}")
        if not 0 <= int(tables.min()) <= int(tables.max()) < cache.num_blocks:
            raise ValueError(f"block tables name blocks outside the cache's {cache.num_blocks}")
        if not 0 < max_length <= tables.shape[1] * cache.block_size:
            raise ValueError(f"a context of {max_length} positions does not fit block tables of {tables.shape[1]}")
        if self.quantized:
            self.shape.isa = ISAS[quant_isa()][0]
        scratch = torch.empty(library.chatloop_llama_decode_scratch(ctypes.byref(self.shape), R, max_length))
        library.chatloop_llama_decode(
            out.data_ptr(), self.layers, len(self.layers), ctypes.byref(self.shape), cache.keys.data_ptr(),
            cache.values.data_ptr(), cache.keys.shape[1], slots.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
            tables.shape[1], cache.block_size, max_length, cos.data_ptr(), signed_sin.data_ptr(), R,
            scratch.data_ptr(), torch.get_num_threads(),
        )
        if rows is not None:
            out = hidden_rows.clone().index_copy_(0, rows, out)
        return out.view(B, T, hidden)
