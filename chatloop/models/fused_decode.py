"""A float32 Llama (Granite, Qwen3, Qwen3-MoE, Mixtral) stage's decode steps in one native call
(``chatloop/kernels/layers.c``).

At batch 1 a decode step of SmolLM2 spent as long between its matmuls (torch ops, ctypes calls, Python) as in
them. Where every layer's matrices run on ChatLoop's kernels (float32 ``KernelLinear`` or ``QuantLinear`` in any
type a partition keeps: q8_0 / q4_1, the k-quants, q5_0 / q5_1, f16 / bf16, and their tiles) and the cache attends
in place, :class:`LlamaDecodeKernel` runs the step's layers with the same kernels in the same order, from C: one
call a step instead of ~20 a layer. q/k/v and gate/up are fused where their types agree, else passed as separate
matrices (a GGUF file's ``attn_v`` often has a type of its own). Each new token is a row of the step: a decode
step's one a sequence, a speculative verify step's several (:data:`~chatloop.models.kv_cache.IN_PLACE_MAX_TOKENS`),
padding left out. Prefill and other dtypes keep the modules' path.

Qwen3's per-head q/k norms go into the call too, and so do a mixture-of-experts stage's sparse MLPs (Qwen3-MoE,
Mixtral) where every expert is quantized, its gate and up merged, in one format pair the expert kernel reads
(:mod:`chatloop.kernels.experts`): the router, softmax, top-k and renormalisation in C, the chosen experts through
the expert kernel's shared entry point, in the modules' order. Where a row's k-th and (k+1)-th routing probabilities
(nearly) tie, whose order ``torch.topk`` decides its own way, the call stops after that layer's attention and the
step finishes on the modules (:attr:`LlamaDecodeKernel.resumed`).
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
    MoELayerSpec,
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


def _moe_spec(mlp: nn.Module) -> tuple[MoELayerSpec, list] | None:
    """The kernel's view of a sparse MLP (:class:`~chatloop.models.moe.SparseMoE`) and what it points into, or None
    where its experts do not take the expert kernel as the modules would (its switch off, an expert unquantized,
    gate and up apart, a bias, formats or row sizes that differ, no kernel for them) or its router is not a
    contiguous float32 matrix."""
    from ..kernels.experts import load_expert_kernels

    router = mlp.gate.weight
    if not mlp.native or load_expert_kernels() is None or router.dtype != torch.float32 \
            or not router.is_contiguous():
        return None
    if not mlp.stacked:
        mlp.stack_experts()  # what the modules' first native call does: the addresses below are final after it
    down_name = mlp.experts[0].names[2]
    pairs = [(e.gate_up, getattr(e, down_name, None)) for e in mlp.experts]
    if not all(isinstance(m, QuantLinear) and m.bias is None for pair in pairs for m in pair):
        return None
    kinds = {(up.fmt, dn.fmt, up.weight.shape[1], dn.weight.shape[1]) for up, dn in pairs}
    if len(kinds) != 1:
        return None
    up_fmt, down_fmt, up_bytes, down_bytes = kinds.pop()
    if fused_format(up_fmt) is None or fused_format(down_fmt) is None:
        return None
    gate_up = (ctypes.c_void_p * len(pairs))(*(up.weight.data_ptr() for up, _ in pairs))
    down = (ctypes.c_void_p * len(pairs))(*(dn.weight.data_ptr() for _, dn in pairs))
    spec = MoELayerSpec(router.data_ptr(), ctypes.addressof(gate_up), ctypes.addressof(down), fused_format(up_fmt),
                        fused_format(down_fmt), up_bytes, down_bytes)
    return spec, [router, gate_up, down, *(m.weight for pair in pairs for m in pair)]


def _qk_norms(attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | bool | None:
    """Qwen3's per-head q/k norm weights; None where the attention has none; False where it has norms the kernel
    does not compute (over the whole projection, OLMo 2's; Gemma's (1 + w))."""
    from .llama import RMSNorm
    from .qwen3 import NormedAttention

    if not isinstance(attention, NormedAttention):
        return None
    if not attention.per_head or type(attention.q_norm) is not RMSNorm or type(attention.k_norm) is not RMSNorm:
        return False
    return attention.q_norm.weight, attention.k_norm.weight


class LlamaDecodeKernel:
    """Runs a stage's decode steps through all its layers in one call; build it with :meth:`for_stage`."""

    def __init__(self, layers: list[LlamaLayerSpec], shape: LlamaShapeSpec, keep: list,
                 modules: list[nn.Module], moe_stage: bool = False) -> None:
        self.layers = (LlamaLayerSpec * len(layers))(*layers)
        self.shape = shape
        self._keep = keep  # the weights (and spec arrays) the specs point into stay alive with them
        self._modules = modules  # the layers, to finish a step the call stopped (a routing tie)
        self.quantized = any(m.format >= 0 for layer in layers
                             for m in (*layer.qkv, layer.o, *layer.gate_up, layer.down)) or shape.experts > 0
        self.resumed = 0
        """Steps the call stopped at a sparse layer whose routing tied, finished on the modules (for the tests)."""
        self.moe_stage = moe_stage
        """A mixture-of-experts model's stage (whose dense layers too leave steps of many rows to the modules)."""
        self.declined = 0
        """Steps of an MoE stage left to the modules: more rows than the quantized kernels take."""

    @classmethod
    def for_stage(cls, stage) -> LlamaDecodeKernel | None:
        """The kernel for a loaded float32 :class:`~chatloop.models.llama.LlamaStage` (Granite's too: its
        attention scale and residual multiplier go into the shape; Qwen3's with its per-head q/k norms) whose
        projections are on ChatLoop's kernels (fused, or of types that could not be) and whose norms and rotary run
        on its row kernels, or for a :class:`~chatloop.models.moe.MoEStage` whose attention's projections are and
        whose sparse MLPs' experts take the expert kernel (see :func:`_moe_spec`); None otherwise."""
        from .llama import MLP, LlamaStage
        from .mixtral import MixtralLayer
        from .moe import MoEStage, SparseMoE
        from .qwen3_moe import Qwen3MoeLayer

        # (MoE families whose layer is exactly the call's: attention, then the sparse or dense MLP, pre-norms)
        is_moe = isinstance(stage, MoEStage) and issubclass(stage.layer_class, (Qwen3MoeLayer, MixtralLayer))
        llama = isinstance(stage, LlamaStage) and stage.single_call_decode
        if not (is_moe or llama) or not stage.native_attention or load_kernels() is None:
            return None
        a = stage.args
        layers, keep, scalars, moe_specs = [], [], set(), []
        for layer in stage.decoder_layers():
            attention = layer.self_attn
            mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
            # what the modules scale by: Granite's layers scale residuals and attention, Llama's attend by 1/sqrt(D)
            scalars.add((attention.scale, getattr(layer, "residual_multiplier", 1.0)))
            if not is_moe and not (attention.native_rope and layer.input_layernorm.native
                                   and layer.post_attention_layernorm.native):
                return None
            qk_norms = _qk_norms(attention)
            if qk_norms is False:
                return None
            qkv = _parts(attention, ("qkv_proj",), ("q_proj", "k_proj", "v_proj"))
            sparse = _moe_spec(mlp) if isinstance(mlp, SparseMoE) else None
            if (isinstance(mlp, SparseMoE) and sparse is None) or not isinstance(mlp, (SparseMoE, MLP)):
                return None
            gate_up = [] if sparse else _parts(mlp, ("gate_up_proj",), ("gate_proj", "up_proj"))
            if qkv is None or gate_up is None:
                return None
            modules = (*qkv, attention.o_proj, *gate_up, *([] if sparse else [mlp.down_proj]))
            matrices = [_matrix(m) for m in modules]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *(qk_norms or ()))
            if any(m is None for m in matrices) or any(n.dtype != torch.float32 for n in norms):
                return None
            empty = MatrixSpec(-1, None, None, 0, 0)
            specs = iter(matrices)
            qkv_specs = [next(specs) for _ in qkv] + [empty] * (3 - len(qkv))
            o = next(specs)
            gate_up_specs = [next(specs) for _ in gate_up] + [empty] * (2 - len(gate_up))
            down = empty if sparse else next(specs)
            spec = LlamaLayerSpec((MatrixSpec * 3)(*qkv_specs), o, (MatrixSpec * 2)(*gate_up_specs), down,
                                  *(n.data_ptr() for n in norms[:2]))
            if qk_norms:
                spec.q_norm, spec.k_norm = (n.data_ptr() for n in qk_norms)
            if sparse:
                moe_specs.append(sparse[0])
                spec.moe = ctypes.pointer(sparse[0])
                keep += sparse[1]
            layers.append(spec)
            keep += [*norms, *(m.weight for m in modules)]
        if len(scalars) > 1:  # one spec a stage: layers that scale apart keep the modules' path
            return None
        quant = load_quant_kernels()

        def address(name: str) -> int | None:
            return ctypes.cast(getattr(quant, name), ctypes.c_void_p).value if quant else None

        shape = LlamaShapeSpec(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size,
                               a.norm_eps, address("chatloop_quant_linear_shared"), 0,
                               address("chatloop_kquant_linear_shared"), address("chatloop_gguf_linear_shared"))
        if moe_specs:
            shape.experts, shape.top_k = a.moe.num_experts, a.moe.top_k
            shape.expert_intermediate, shape.norm_topk_prob = a.moe.intermediate_size, int(a.moe.norm_topk_prob)
        keep += moe_specs
        if layers:
            attention_scale, shape.residual_multiplier = scalars.pop()
            shape.attention_scale = 0.0 if attention_scale is None else attention_scale  # 0: 1/sqrt(D), as in C
        return cls(layers, shape, keep, stage.decoder_layers(), is_moe) if layers else None

    def __call__(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache, cos: torch.Tensor,
                 signed_sin: torch.Tensor) -> torch.Tensor:
        """The hidden states [B, T, C] after the stage's layers, for a micro-batch the cache decodes in place
        (:attr:`PagedKVCache.decode_in_place`); writes the step's keys and values into ``cache``. Each new token
        is a row of the step (a verify step's tokens attend to each other through the cache); padding's rows come
        back as they went in (but where a routing tie finished the step on the modules)."""
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
        rope = cos, signed_sin
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
        if self.moe_stage and self.quantized and B * T > quant_modules.KERNEL_ROWS:
            # The modules multiply more rows (padding's included) than the quantized kernels take on torch's GEMM,
            # with float activations (a 9-token prompt beside a 3-token one attends in place too): run them, not
            # another rounding.
            self.declined += 1
            for layer in self._modules:
                x = layer(x, batch, cache, *rope)
            return x
        threads = torch.get_num_threads()
        if self.quantized:
            self.shape.isa = ISAS[quant_isa()][0]
        moe_bytes = 0
        if self.shape.experts:
            from ..kernels.experts import load_expert_kernels, shared_experts_entry

            self.shape.moe_experts, self.shape.moe_kernels = shared_experts_entry(quant_isa())
            moe_bytes = library.chatloop_llama_decode_moe_scratch(ctypes.byref(self.shape), R) \
                + load_expert_kernels().chatloop_moe_scratch(R * self.shape.top_k, R, hidden,
                                                             self.shape.expert_intermediate, threads)
        scratch = torch.empty(library.chatloop_llama_decode_scratch(ctypes.byref(self.shape), R, max_length))
        moe_scratch = torch.empty(moe_bytes, dtype=torch.uint8)
        done = library.chatloop_llama_decode(
            out.data_ptr(), self.layers, len(self.layers), ctypes.byref(self.shape), cache.keys.data_ptr(),
            cache.values.data_ptr(), cache.keys.shape[1], slots.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
            tables.shape[1], cache.block_size, max_length, cos.data_ptr(), signed_sin.data_ptr(), R,
            scratch.data_ptr(), threads, moe_scratch.data_ptr() if moe_bytes else None,
        )
        if rows is not None:
            out = hidden_rows.clone().index_copy_(0, rows, out)
        out = out.view(B, T, hidden)
        if done < len(self.layers):  # a routing tie in layer `done`: its MLP and the later layers on the modules
            self.resumed += 1
            layer = self._modules[done]
            mlp = getattr(layer, "mlp", None) or layer.block_sparse_moe
            out = out + mlp(layer.post_attention_layernorm(out))
            for layer in self._modules[done + 1:]:
                out = layer(out, batch, cache, *rope)
        return out
