"""Shared fixtures: tiny random-weight checkpoints, split SmolLM2, and a one-process pipeline.

Shape legend: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 128


def tiny_hf_config(family: str):
    """A transformers config of a tiny model of ``family`` (hidden 64, vocab 128).

    llama: untied head, Llama-3 RoPE scaling, grouped-query attention, 5 layers (an uneven
    4-way split); qwen2: tied embeddings, attention bias; both with a non-default RoPE theta.
    gpt2: tied, learned positions.
    """
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=256,
            rope_theta=50000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            rope_theta=1000000.0,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=TINY_VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
        )
    if family in TINY_FAMILY_CONFIGS:
        return TINY_FAMILY_CONFIGS[family]()
    raise ValueError(f"no tiny config for {family!r}: use llama, qwen2, gpt2, {', '.join(TINY_FAMILY_CONFIGS)}")


def _tiny_qwen3():
    """Qwen3: head_dim 32 apart from hidden / heads (16), untied head, per-head q/k norms, GQA."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                       max_position_embeddings=256, rope_theta=1000000.0)


def _tiny_granite():
    """Granite: all four multipliers away from 1 (as Granite 3's are), tied head, GQA; biases on every projection
    (off in published checkpoints, where transformers puts them: o_proj and down_proj too)."""
    from transformers import GraniteConfig

    return GraniteConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=256, rope_theta=10000.0, embedding_multiplier=12.0,
                         residual_multiplier=0.22, attention_multiplier=0.09, logits_scaling=8.0,
                         attention_bias=True, mlp_bias=True)


def _tiny_olmo2():
    """OLMo 2: post-norms only, q/k norms over the whole projection, untied head, GQA."""
    from transformers import Olmo2Config

    return Olmo2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=256, rope_theta=500000.0, pad_token_id=1, bos_token_id=None,
                       eos_token_id=0)


def _tiny_phi3():
    """Phi-3 as its 128k variants (and Phi-4-mini): longrope RoPE whose long factors take over past position 16
    (the goldens' decode steps cross it), half of each head rotated, a sliding window of 24 (crossed too), tied."""
    from transformers import Phi3Config

    g = torch.Generator().manual_seed(3)
    short, long = ((1 + torch.rand(4, generator=g) * scale).tolist() for scale in (0.5, 8.0))
    return Phi3Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64, original_max_position_embeddings=16, sliding_window=24,
                      partial_rotary_factor=0.5, pad_token_id=1, bos_token_id=0, eos_token_id=0,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                       "long_factor": long, "partial_rotary_factor": 0.5,
                                       "original_max_position_embeddings": 16})


def _tiny_gemma3():
    """Gemma 3 text: sliding-window layers (window 8: the goldens cross it) with their own RoPE base beside full
    ones with linear scaling, query_pre_attn_scalar apart from head_dim, final logit soft-capping, tied."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                            max_position_embeddings=256, sliding_window=8, final_logit_softcapping=3.0,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention", "full_attention"],
                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 1000000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                            pad_token_id=1, bos_token_id=0, eos_token_id=0)


def _tiny_gemma2():
    """Gemma 2: alternating sliding-window (8) and full layers, attention soft-capped at 2 (scores do reach it
    here) and logits at 3, query_pre_attn_scalar apart from head_dim, tied."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                        max_position_embeddings=256, sliding_window=8, attn_logit_softcapping=2.0,
                        final_logit_softcapping=3.0, pad_token_id=1, bos_token_id=0, eos_token_id=0)


TINY_FAMILY_CONFIGS = {"qwen3": _tiny_qwen3, "granite": _tiny_granite, "olmo2": _tiny_olmo2, "phi3": _tiny_phi3,
                       "gemma3_text": _tiny_gemma3, "gemma2": _tiny_gemma2}
"""The families of issue 20 (tests/unit/test_families.py): a builder of a tiny transformers config each."""

# name -> (model_type, config options). 4 layers: 1, 2 and 4 stages all cut between layers.
TINY_MOE_VARIANTS = {
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen3_moe-unnormed": ("qwen3_moe", {"norm_topk_prob": False}),
    # layers 0 and 2 dense (sparse step 2), 3 dense too (mlp_only_layers): only layer 1 is sparse
    "qwen3_moe-mixed": ("qwen3_moe", {"norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
    "mixtral": ("mixtral", {}),
}
"""The mixture-of-experts variants (tests/unit/test_moe.py): ``tiny_checkpoint`` builds them with ``build_tiny_moe``."""


def tiny_moe_config(variant: str):
    """A transformers config of a tiny mixture-of-experts model, 8 experts, 2 a token."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    family, options = TINY_MOE_VARIANTS[variant]
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2,
                  tie_word_embeddings=False)
    if family == "qwen3_moe":  # head_dim 32, not 64 / 4; dense layers 96 wide, experts 32
        return Qwen3MoeConfig(**common, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                              rope_theta=1e6, **options)
    return MixtralConfig(**common, intermediate_size=32, num_local_experts=8, rope_theta=1e6, **options)


def build_tiny_model(family: str, seed: int = 0):
    """A tiny random-weight transformers model whose every weight matters to the logits.

    transformers' own init (std 0.02, zero biases, unit norms) leaves attention almost
    uniform, so a wrong rotary scaling or a dropped bias would change the logits by less
    than the tolerance. Here matrices get std 0.15 (peaky attention, logits of order 1),
    biases noise, and norm weights 1 + noise.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return randomize_weights(AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=torch.float32))


def cgroup_tree(tmp_path: Path, files: dict[str, str], membership: str) -> tuple[Path, Path]:
    """A fake cgroup filesystem under ``tmp_path`` (``files``: relative path -> text) and a /proc/self/cgroup file
    holding ``membership``; returns (root, that file)."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    return tmp_path, tmp_path / "self-cgroup"


def randomize_weights(model):
    """``model`` with matrices of std 0.15, biases of noise and norm weights 1 + noise (see
    :func:`build_tiny_model`), in eval mode; seed torch first."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
            else:
                param.normal_(1.0, 0.2)
    return model.eval()


def build_tiny_moe(variant: str, seed: int = 0):
    """A tiny random MoE whose every weight matters (see ``build_tiny_model``): matrices std 0.15,
    norms 1 + noise; the routers std 0.5, so that tokens spread over the experts with clear margins."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(variant), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0.0, 0.5)
            elif param.dim() >= 2:
                param.normal_(0.0, 0.15)
            else:
                param.normal_(1.0, 0.2)
    return model.eval()


def save_tiny_tokenizer(folder) -> None:
    """A 128-token word-level tokenizer (one character a token) saved into ``folder``, so that ChatLoop starts on a
    tiny checkpoint; tests that use it give prompts as token ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(32 + i) if i < 95 else f"<t{i}>": i for i in range(TINY_VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<t127>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<t127>", eos_token="<t126>").save_pretrained(folder)


@dataclass
class TinyCheckpoint:
    """A saved tiny checkpoint folder and the transformers model that wrote it."""

    family: str
    path: Path
    model: torch.nn.Module

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        return bool(self.model.config.tie_word_embeddings)


@pytest.fixture(scope="session", autouse=True)
def hydra_runs_outside_the_repo(tmp_path_factory):
    """The CLIs the tests start write their Hydra run folders under pytest's temporary folder, not ./outputs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATLOOP_OUTPUTS", str(tmp_path_factory.mktemp("hydra-runs")))
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., TinyCheckpoint]:
    """``tiny_checkpoint(family, max_shard_size=None)``: a saved tiny checkpoint, built once per session; ``family``
    is llama, qwen2, gpt2, a key of TINY_FAMILY_CONFIGS or of TINY_MOE_VARIANTS.

    Tests must not modify the folder or the model; copy the folder to damage it.
    """
    made: dict[tuple[str, str | None], TinyCheckpoint] = {}

    def make(family: str, max_shard_size: str | None = None) -> TinyCheckpoint:
        key = (family, max_shard_size)
        if key not in made:
            model = build_tiny_moe(family) if family in TINY_MOE_VARIANTS else build_tiny_model(family)
            name = f"{family}-sharded" if max_shard_size else family
            path = tmp_path_factory.mktemp(name)
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(path, **kwargs)
            made[key] = TinyCheckpoint(family, path, model)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct checkpoint (converted from the GGUF on first use, ~30 s)."""
    from chatloop.embedded import embedded_checkpoint

    return embedded_checkpoint("smollm2")


@pytest.fixture(scope="session")
def smollm2_split(smollm2_checkpoint, tmp_path_factory) -> Path:
    """SmolLM2 split once into 4 partitions in a temporary folder."""
    from chatloop.partition.splitter import split_model

    out = tmp_path_factory.mktemp("smollm2-4")
    split_model("smollm2", out, 4, progress=False)
    return out


@pytest.fixture(scope="session")
def local_smollm2_config(smollm2_split) -> Callable[..., object]:
    """``local_smollm2_config(*overrides)``: SmolLM2 over 4 stages in this process (no RPC), a small KV cache."""
    from chatloop import load_config

    def config(*more: str):
        return load_config(["cluster=single", "cluster.num_workers=4", f"model.partitions_dir={smollm2_split}",
                            "cache.kv_cache_mb=32", *more])

    return config


@pytest.fixture(scope="module")
def llm(local_smollm2_config):
    """A ChatLoop on ``local_smollm2_config()``, one per test module (a module may define its own)."""
    from chatloop import ChatLoop

    with ChatLoop.start(local_smollm2_config()) as llm:
        yield llm


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_checkpoint):
    """The embedded SmolLM2 in transformers, fp32, the golden reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()


@dataclass
class Pipeline:
    """The stages of one split model run one after another in this process, each with its own KV cache.

    Sequences get shuffled, interleaved cache blocks so that the block tables matter. The
    same tables index every stage's cache, as the coordinator's do.
    """

    stages: list
    block_size: int = 4
    num_blocks: int = 64
    seed: int = 0
    caches: list = field(init=False)
    tables: list[list[int]] = field(init=False, default_factory=list)
    lengths: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.caches = [stage.new_cache(self.num_blocks, self.block_size) for stage in self.stages]
        self._free = list(range(self.num_blocks))
        random.Random(self.seed).shuffle(self._free)

    def run(self, inputs: torch.Tensor, batch, all_logits: bool = False) -> torch.Tensor:
        """One micro-batch through every stage."""
        x = inputs
        with torch.no_grad():
            for stage, cache in zip(self.stages, self.caches):
                x = stage(x, batch, cache, all_logits=all_logits)
        return x

    def _ensure_blocks(self, total_lengths: list[int]) -> None:
        for b, total in enumerate(total_lengths):
            while len(self.tables[b]) * self.block_size < total:
                self.tables[b].append(self._free.pop())

    def prefill(self, prompts: list[list[int]], pad_id: int = 7, all_logits: bool = False) -> torch.Tensor:
        """Start one sequence per prompt (padded to the longest with ``pad_id``); logits [B, V] or [B, T, V]."""
        from chatloop.models import StepBatch

        self.tables = [[] for _ in prompts]
        self.lengths = [len(p) for p in prompts]
        self._ensure_blocks(self.lengths)
        width = max(self.lengths)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts])
        batch = StepBatch.build([0] * len(prompts), self.lengths, self.tables, self.block_size)
        return self.run(ids, batch, all_logits=all_logits)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One new token per sequence; logits [B, V] of the next token."""
        from chatloop.models import StepBatch

        self._ensure_blocks([n + 1 for n in self.lengths])
        batch = StepBatch.build(list(self.lengths), [1] * len(tokens), self.tables, self.block_size)
        self.lengths = [n + 1 for n in self.lengths]
        return self.run(torch.tensor(tokens)[:, None], batch)


@pytest.fixture(scope="session")
def load_pipeline() -> Callable[..., Pipeline]:
    """``load_pipeline(directory, pack_weights=False, native_kernels=True, dtype=None, **pipeline_options)``: every
    stage of a split model, loaded with ``load_stage``."""
    from chatloop.partition import Manifest, load_stage

    def load(
        directory: Path, pack_weights: bool = False, native_kernels: bool = True, dtype=None, **options
    ) -> Pipeline:
        manifest = Manifest.load(directory)
        stages = [
            load_stage(
                directory, i, expected_layers=manifest.partitions[i].layers, verify_sha256=True,
                pack_weights=pack_weights, native_kernels=native_kernels, dtype=dtype,
            )
            for i in range(manifest.num_partitions)
        ]
        return Pipeline(stages, **options)

    return load
