"""What mixture-of-experts families share: their config, the sparse MLP (router plus experts), and a Llama-style
stage whose layers they supply.

A sparse MLP routes each token to ``top_k`` of its ``E`` experts. The router is softmax over all experts' logits
then ``torch.topk`` (as transformers does, so ties go the same way), optionally renormalised over the chosen
``k`` (which equals a softmax over the top-k logits: Mixtral always does it, Qwen3-MoE with ``norm_topk_prob``).
The micro-batch's rows are grouped by expert: each expert that some row chose runs once, on its rows only, and
its weighted output is added back. A decode step of B rows so reads at most ``B * top_k`` experts' weights, not all
``E``: that is what lets a model too big for one host's memory run at the speed of its active parameters. Quantized
experts run in one native call a layer (:mod:`chatloop.kernels.experts`), the others through their modules.

Shape legend: B sequences, T new tokens, N = B*T rows, C hidden size, E experts, k experts per token,
F expert intermediate size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .args import MOE_FAMILIES, ModelArgs
from .batch import StepBatch
from .layer_range import LayerRange
from .stage_model import StageModel

__all__ = ["MOE_FAMILIES", "MoEArgs", "MoEStage", "Router", "SparseMoE", "check_expert_layout", "moe_args"]

_STACKED = re.compile(
    r"^model\.layers\.\d+\.(mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj|w[123])(\.weight)?$")

# Options of MoE configs that change the computation and that ChatLoop does not implement: refused by name.
_UNSUPPORTED = {
    "shared_expert_intermediate_size": "shared experts",
    "n_shared_experts": "shared experts",
    "num_shared_experts": "shared experts",
    "moe_layer_freq": "a layer frequency of MoE layers",
    "first_k_dense_replace": "leading dense layers",
    "topk_group": "grouped expert selection",
    "routed_scaling_factor": "scaled routing weights",
}


@dataclass(frozen=True)
class MoEArgs:
    """The sparse MLP's shape and routing, read from a ``config.json``."""

    num_experts: int
    """``E``: experts per sparse layer (``num_experts``, or ``num_local_experts`` as Mixtral names it)."""
    top_k: int
    """Experts each token runs (``num_experts_per_tok``)."""
    intermediate_size: int
    """An expert's intermediate size (Qwen3-MoE's ``moe_intermediate_size``; Mixtral's ``intermediate_size``)."""
    norm_topk_prob: bool
    """Renormalise the chosen experts' probabilities to sum to 1 (always, for Mixtral)."""
    cast_scores: bool
    """Round the routing weights to the activations' dtype before weighting (Qwen3-MoE) rather than weighting in
    float32 and rounding the product (Mixtral): what transformers does, which shows in bfloat16."""
    decoder_sparse_step: int = 1
    """Every ``decoder_sparse_step``-th layer (counting from 1) is sparse, the others dense."""
    mlp_only_layers: tuple[int, ...] = ()
    """Layers that are dense whatever ``decoder_sparse_step`` says."""

    def is_sparse(self, layer: int) -> bool:
        """Whether ``layer`` (global index) has a sparse MLP; a dense one otherwise (of the model's
        ``intermediate_size``), as transformers' Qwen3-MoE decides."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


def moe_args(config: dict[str, Any]) -> MoEArgs:
    """The MoE part of a ``qwen3_moe`` or ``mixtral`` ``config.json``; ``ValueError`` naming any option that
    ChatLoop does not implement."""
    family = config.get("model_type")
    for option, what in _UNSUPPORTED.items():
        if config.get(option):
            raise ValueError(f"{family} config sets {option}={config[option]!r} ({what}): ChatLoop's MoE layers do "
                             f"not implement it; use a checkpoint without {option}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{family} config sets hidden_act={config['hidden_act']!r}: ChatLoop's experts are SwiGLU "
                         "(silu); use a checkpoint with hidden_act silu")
    num_experts = config.get("num_experts", config.get("num_local_experts"))
    top_k = config.get("num_experts_per_tok")
    if num_experts is None or top_k is None:
        raise ValueError(f"{family} config lacks num_experts (or num_local_experts) or num_experts_per_tok: "
                         "is config.json complete?")
    if family == "mixtral":
        moe = MoEArgs(num_experts, top_k, config["intermediate_size"], norm_topk_prob=True, cast_scores=False)
    else:
        step = config.get("decoder_sparse_step", 1)
        if step < 1:
            raise ValueError(f"decoder_sparse_step is {step}: it must be at least 1")
        moe = MoEArgs(num_experts, top_k, config["moe_intermediate_size"],
                      norm_topk_prob=bool(config.get("norm_topk_prob", False)), cast_scores=True,
                      decoder_sparse_step=step, mlp_only_layers=tuple(config.get("mlp_only_layers") or ()))
    if num_experts > 0 and not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok is {top_k}, the model has {num_experts} experts: "
                         f"it must be between 1 and {num_experts}")
    return moe


def check_expert_layout(keys: Iterable[str]) -> None:
    """Refuse a checkpoint whose experts are stacked in 3-D tensors (``mlp.experts.gate_up_proj`` [E, 2F, C],
    ``mlp.experts.down_proj`` [E, C, F]), as transformers 5 holds them in memory: published Qwen3-MoE and Mixtral
    checkpoints, and transformers' ``save_pretrained``, store one linear per expert, which is what a stage loads."""
    for key in keys:
        if _STACKED.match(key):
            raise ValueError(f"{key} holds all experts of a layer in one tensor: ChatLoop reads one linear per "
                             "expert (experts.N.gate_proj.weight, ...), as published checkpoints store them; load the "
                             "model in transformers and save it again with save_pretrained, which writes that layout")


class Expert(nn.Module):
    """One SwiGLU expert, its projections named as the checkpoint names them (``gate_proj``/``up_proj``/
    ``down_proj``, or Mixtral's ``w1``/``w3``/``w2``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        self.intermediate_size = intermediate_size
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, up, nn.Linear(hidden_size, intermediate_size, bias=False))
        setattr(self, down, nn.Linear(intermediate_size, hidden_size, bias=False))
        self.gate_up: nn.Module | None = None
        """The gate and up projections as one layer, once :meth:`fuse_gate_up` merged them."""

    def fuse_gate_up(self) -> bool:
        """Merge quantized gate and up projections into one layer (their rows stacked): a batch-1 expert then makes
        two kernel calls instead of three, and quantizes its input once. Each output row is computed as before, so
        decode gives the same values. Float projections stay apart (their GEMM would round another way). Whether
        they were merged."""
        from ..quant import QuantLinear
        from .packing import concat_linear

        gate, up, _ = self.names
        parts = [getattr(self, gate), getattr(self, up)]
        if not all(isinstance(p, QuantLinear) for p in parts):
            return False
        merged = concat_linear(parts)
        if merged is None:
            return False
        self.gate_up = merged
        delattr(self, gate)
        delattr(self, up)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_name, up_name, down_name = self.names
        if self.gate_up is not None:
            gate, up = self.gate_up(x).split(self.intermediate_size, dim=-1)
            return getattr(self, down_name)(F.silu(gate) * up)
        return getattr(self, down_name)(F.silu(getattr(self, gate_name)(x)) * getattr(self, up_name)(x))


class Router(nn.Module):
    """The router's logits ``x @ weight.T`` [N, E] (``weight`` [E, C], no bias), always on torch's own matmul.

    Not an ``nn.Linear``, so that neither packing nor a quantization scheme replaces it: it is a few hundredths
    of a percent of an MoE layer's bytes, and a logit rounded another way than transformers rounds it can change
    which of two near-tied experts a token runs (in bfloat16 one rounding step often decides).
    """

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, experts={self.weight.shape[0]}"


class SparseMoE(nn.Module):
    """A router (``gate``, [E, C], no bias) and ``E`` experts; each token runs its top ``k``."""

    def __init__(self, hidden_size: int, moe: MoEArgs, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.moe = moe
        self.gate = Router(hidden_size, moe.num_experts)
        self.experts = nn.ModuleList(Expert(hidden_size, moe.intermediate_size, names)
                                     for _ in range(moe.num_experts))
        self.native = True
        """Run the chosen experts in one native call where they allow it (see :meth:`_native`); off: through
        their modules, one call a projection (the tests' reference)."""
        self.stacked = False
        """Whether :meth:`stack_experts` has run (the first native call runs it: after the loader's last
        re-layout of the weights)."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E], routing weights [N, k] and chosen experts [N, k] (int64) of rows ``x`` [N, C],
        computed as transformers computes them."""
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.moe.cast_scores:
            weights = weights.to(logits.dtype)
        return logits, weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        rows = x.reshape(-1, C)  # [N, C]
        _, weights, chosen = self.route(rows)
        out = torch.zeros_like(rows)
        if rows.shape[0] == 1:  # batch-1 decode: every chosen expert runs on the one row
            return self._one_row(rows, weights[0], chosen[0], out).view(B, T, C)
        # Group the rows by expert: one sort instead of a mask per expert; experts in ascending order, as
        # transformers adds them.
        flat = chosen.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.moe.num_experts).tolist()
        token = order // self.moe.top_k  # the row of each (row, choice) pair, grouped by expert
        weight = weights.reshape(-1).index_select(0, order)
        used = [expert for expert, count in enumerate(counts) if count]
        if self._native(rows, out, used, [counts[e] for e in used], token, weight):
            return out.view(B, T, C)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue  # never read: a decode step touches only the experts its rows chose
            index = token[start : start + count]
            y = self.experts[expert](rows.index_select(0, index)) * weight[start : start + count, None]
            # Not index_add_, which sorts its index on every call (fbgemm's parallel radix sort: 0.1-0.9 ms here,
            # k times a layer). A row chooses an expert once, so `index` has no repeats and copying back the
            # rows' sums adds exactly what index_add_ adds.
            out.index_copy_(0, index, out.index_select(0, index) + y.to(out.dtype))
            start += count
        return out.view(B, T, C)

    def _one_row(self, row: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
        """``forward`` of one row [1, C] (a batch-1 decode step): its ``k`` experts (``weights``, ``chosen`` [k]) in
        ascending order, each added to ``out`` in place, the sums :meth:`forward`'s grouping makes, without its
        index arithmetic (a dozen small ops an expert, as long as the expert's matmuls on this shape)."""
        experts, order = torch.sort(chosen)
        weights = weights.index_select(0, order)
        used = experts.tolist()
        k = len(used)
        if self._native(row, out, used, [1] * k, torch.zeros(k, dtype=torch.int64), weights):
            return out
        for j, expert in enumerate(used):
            out.add_((self.experts[expert](row) * weights[j]).to(out.dtype))
        return out

    def _native(self, rows: torch.Tensor, out: torch.Tensor, used: list[int], counts: list[int],
                token: torch.Tensor, weight: torch.Tensor) -> bool:
        """Run experts ``used`` (ascending) on their rows in one native call (:mod:`chatloop.kernels.experts`),
        adding into ``out`` what the modules' path adds: ``counts[j]`` rows each, ``token`` and ``weight`` the rows
        and routing weights grouped by expert. False, having done nothing, where the call does not apply: the
        switch :attr:`native` off, float rows or experts, gate and up not merged, formats that differ between
        experts or that no kernel reads, or an expert of more rows than the quantized kernel takes (prefill of
        long prompts: the modules then multiply dequantized weights on torch's GEMM, as a lone linear layer
        would)."""
        from ..quant import QuantLinear
        from ..quant import modules as quant_modules

        if not self.native or rows.dtype != torch.float32 or weight.dtype != torch.float32 \
                or max(counts) > quant_modules.KERNEL_ROWS:
            return False
        from ..kernels import fused_format, quant_isa
        from ..kernels.experts import load_expert_kernels, moe_experts_unchecked

        # Where QuantLinear multiplies on the kernel (its switch, which tests turn off for float activations).
        if quant_modules.load_quant_kernels() is None or load_expert_kernels() is None:
            return False
        if not self.stacked:
            self.stack_experts()
        down_name = self.experts[0].names[2]
        gate_up, down, formats, row_bytes = [], [], set(), set()
        for expert in used:
            module = self.experts[expert]
            up, dn = module.gate_up, getattr(module, down_name)
            if not (isinstance(up, QuantLinear) and isinstance(dn, QuantLinear)) or up.bias is not None \
                    or dn.bias is not None:
                return False
            gate_up.append(up.weight.data_ptr())
            down.append(dn.weight.data_ptr())
            formats.add((up.fmt, dn.fmt))
            row_bytes.add((up.weight.shape[1], dn.weight.shape[1]))
        if len(formats) != 1 or len(row_bytes) != 1:
            return False
        numbers = tuple(fused_format(f) for f in formats.pop())
        if None in numbers:
            return False
        moe_experts_unchecked(rows.contiguous(), out, gate_up, down, numbers, row_bytes.pop(), counts,
                              token.contiguous(), weight.contiguous(), self.moe.intermediate_size, quant_isa())
        return True


    def stack_experts(self) -> bool:
        """Move every expert's quantized matrices (all gate/up, then all down, as a GGUF file stacks them) into one
        2 MiB-aligned block on transparent huge pages (:func:`~chatloop.kernels.experts.huge_page_block`), each
        module's weight a view of it, and free the separate copies. The bytes are the same, so the outputs are;
        the native call reads them faster (fewer TLB misses). Whether it moved them: not where an expert is
        unquantized or its gate and up were not merged."""
        from ..kernels.experts import move_to_huge_pages
        from ..quant import QuantLinear

        self.stacked = True
        down_name = self.experts[0].names[2]
        layers = [e.gate_up for e in self.experts] + [getattr(e, down_name) for e in self.experts]
        if not all(isinstance(m, QuantLinear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.uint8
                   for m in layers):
            return False
        move_to_huge_pages(layers)
        return True


class MoEStage(StageModel):
    """A Llama-style stage (token embedding, RMSNorm, rotary positions, tied or untied head) whose decoder layers
    a family supplies through ``layer_class(args, layer)``.

    Not a :class:`~chatloop.models.llama.LlamaStage`: the loader's Llama-only fusing of float q/k/v and gate/up
    leaves it alone. A float32 stage whose experts are quantized decodes in the one native call of
    :mod:`~chatloop.models.fused_decode` (attention, router, top-k and the chosen experts of all its layers);
    prefill, float experts and other dtypes run on the modules (decode attention still reads the paged cache in
    place on ChatLoop's kernel).
    """

    embedding_path = "model.embed_tokens"
    layer_class: Callable[[ModelArgs, int], nn.Module]

    def __init__(self, args: ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> None:
        from .llama import RMSNorm, rope_frequencies

        super().__init__(args, layers, is_first, is_last)
        if args.moe is None:
            raise ValueError(f"{type(self).__name__} needs a mixture-of-experts config, got model_type {args.family}")
        self.inv_freq = rope_frequencies(args)  # a plain attribute: float32, not in the state dict
        self.model = nn.Module()
        if is_first or (is_last and args.tie_word_embeddings):
            self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): type(self).layer_class(args, i) for i in layers.indices})
        if is_last:
            self.model.norm = RMSNorm(args.hidden_size, args.norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, then each quantized expert's gate and up projections merged
        (:meth:`Expert.fuse_gate_up`) and each layer's quantized query, key and value projections: before the loader
        packs the weights, as it merges a Llama layer's. Quantized only: the kernel computes each output row alone,
        so a decode step gives the same values; float projections stay apart (their GEMMs would round another way)."""
        from ..quant import QuantLinear
        from .packing import concat_linear

        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for module in self.modules():
            if isinstance(module, Expert):
                module.fuse_gate_up()
        for layer in self.decoder_layers():
            attention = layer.self_attn
            parts = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
            if all(isinstance(p, QuantLinear) for p in parts) and (qkv := concat_linear(parts)) is not None:
                attention.qkv_proj = qkv  # Attention.project splits its output
                del attention.q_proj, attention.k_proj, attention.v_proj
        return result

    def embed(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.layers.values())

    def layer_inputs(self, batch: StepBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        from .llama import LlamaStage

        return LlamaStage.layer_inputs(self, batch, dtype)  # rotary cos and signed sin, as Llama's

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)
