"""GPT-2: learned positions, LayerNorm, fused QKV in Conv1D layout ([in, out] weights), GELU (tanh).

Shape legend: B sequences, T new tokens, C hidden size, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .batch import StepBatch
from .kv_cache import PagedKVCache
from .layer_range import LayerRange
from .stage_model import StageModel, attend

__all__ = ["GPT2Stage"]


class Conv1D(nn.Module):
    """A linear layer whose weight is stored [in, out], as in GPT-2 checkpoints."""

    def __init__(self, num_in: int, num_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_in, num_out))
        self.bias = nn.Parameter(torch.zeros(num_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)

    def as_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [out, in], bias): the layer as an ``nn.Linear`` would hold it (for weight packing)."""
        return self.weight.t(), self.bias


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, args.num_heads, args.head_dim
        self.c_attn = Conv1D(args.hidden_size, 3 * args.hidden_size)
        self.c_proj = Conv1D(args.hidden_size, args.hidden_size)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim) for t in self.c_attn(x).split(C, dim=-1))
        return self.c_proj(attend(q, self.layer, k, v, cache, batch))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.c_fc = Conv1D(args.hidden_size, args.intermediate_size)
        self.c_proj = Conv1D(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.attn = Attention(args, layer)
        self.ln_2 = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: PagedKVCache) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Stage(StageModel):
    """A contiguous range of GPT-2 blocks; the first stage embeds, the last holds ``ln_f`` and the tied head."""

    embedding_path = "transformer.wte"

    def __init__(self, args: ModelArgs, layers: LayerRange, is_first: bool, is_last: bool) -> None:
        super().__init__(args, layers, is_first, is_last)
        self.transformer = nn.Module()
        if is_first or (is_last and args.tie_word_embeddings):
            self.transformer.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        if is_first:
            self.transformer.wpe = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.transformer.h = nn.ModuleDict({str(i): Block(args, i) for i in layers.indices})
        if is_last:
            self.transformer.ln_f = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def embed(self, token_ids: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return self.transformer.wte(token_ids) + self.transformer.wpe(batch.positions)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.transformer.h.values())

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)
