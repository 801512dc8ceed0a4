"""What the windowed layers' own KV pool buys a model that mixes windowed and full layers: the tokens the full
layers' pool holds with two pools against one pool for every layer, on the same ``cache.kv_cache_mb`` per worker.

No timing: the sizes ``chatloop.stage.runner.kv_pools`` gives each stage for Gemma 3 shapes (1B: 26 layers, 1 KV
head of 256, window 512; 4B: 34 layers, 4 KV heads of 256, window 1024; every sixth layer full), even splits over
1 and 4 workers, bfloat16 blocks of 16 tokens, the defaults' ``max_batch_size`` 16, ``prefill_chunk_tokens`` 256
and 4 drafted tokens (the windowed pool the coordinator asks for: ``window_pool_blocks``).

    .venv/bin/python -m benchmarks.window_pools
"""

from __future__ import annotations

from chatloop.config import ChatLoopConfig
from chatloop.models import LayerRange, ModelArgs
from chatloop.stage.runner import StageSpec, kv_blocks, kv_pools, window_pool_blocks

__all__ = ["gemma3_shape", "main"]


def gemma3_shape(num_layers: int, hidden: int, num_heads: int, num_kv_heads: int, window: int) -> ModelArgs:
    """A Gemma 3 text model's shape (head_dim 256; layers 6, 12... full, the others windowed)."""
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]
    return ModelArgs.from_hf_config(dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=256,
        max_position_embeddings=32768, sliding_window=window, layer_types=types, query_pre_attn_scalar=256))


def main() -> None:
    cfg = ChatLoopConfig()
    print("model       workers kv_cache_mb  one pool (tokens)  two pools: full (tokens)  windowed (blocks)  gain")
    for name, args in (("gemma-3-1b", gemma3_shape(26, 1152, 4, 1, 512)), ("gemma-3-4b", gemma3_shape(34, 2560, 8, 4,
                                                                                                     1024))):
        target = window_pool_blocks(cfg, args)
        for workers in (1, 4):
            per = -(-args.num_layers // workers)
            ranges = [LayerRange(s, min(args.num_layers, s + per) - 1) for s in range(0, args.num_layers, per)]
            for budget in (512, 2048):
                spec = StageSpec(name="w", index=0, directory=".", kv_cache_mb=budget, block_size=16,
                                 dtype="bfloat16", min_capacity_tokens=16, window_blocks=target)
                one = min(kv_blocks(spec, args, len(r)) for r in ranges)
                pools = [kv_pools(spec, args, r) for r in ranges]
                full, windowed = min(p[0] for p in pools), min(p[1] for p in pools if p[1])
                print(f"{name:<11} {workers:>7} {budget:>11} {one * 16:>18} {full * 16:>25} "
                      f"{windowed:>12} of {target:<4} {full / one:.2f}x")


if __name__ == "__main__":
    main()
