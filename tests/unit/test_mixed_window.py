"""Models that mix windowed and full-attention layers (Gemma 2 and 3, Qwen2 below ``max_window_layers``; issue 20
point 3): their windowed layers keep keys and values in a pool of their own, indexed by a second block table per
sequence that slides with the window, so the blocks that fall out of the window go back to that pool while the
full layers keep their sequence's whole length.

Tiny random checkpoints written by transformers (tests/conftest.py; windows of 8 and 5 positions), prompts and
generations several windows long, blocks of 2 tokens: the greedy tokens must be transformers' own, the windowed
blocks a sequence holds must stay within what its window and step span, and every block must come back.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from test_policy import CharTokenizer
from test_sliding_window import _greedy_reference, same_content, two_turns
from test_sliding_window import tiny_model as windowed_model

from chatloop.engine.blocks import BlockAllocator
from chatloop.engine.errors import ContextLengthError
from chatloop.engine.pipeline import LocalPipeline, MicroBatch
from chatloop.engine.policy import SchedulerPolicy
from chatloop.engine.requests import AcceptedTokens, SamplingParams
from chatloop.models import ModelArgs, StepBatch
from chatloop.models.batch import padded
from chatloop.partition import Manifest, load_stage
from chatloop.partition.splitter import split_model
from chatloop.stage import StageRunner

BLOCK = 2
FAMILIES = ["gemma2", "gemma3_text", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint, tmp_path_factory):
    """``mixed(family, num_stages)``: (transformers model, split folder) of a tiny model that mixes windowed and full
    layers: Gemma 2 (window 8, layers 0 and 2 windowed), Gemma 3 (window 8, layers 1 and 4 full), Qwen2 (window 5,
    layer 0 full), Qwen3 (window 6, layers 0 and 1 full: over two stages, one keeps a single pool and ignores the
    window tables, the other holds windowed layers only)."""
    made: dict = {}

    def make(family: str, num_stages: int = 1):
        if family not in made:
            if family in ("qwen2", "qwen3"):
                model, path = windowed_model(family), tmp_path_factory.mktemp(f"{family}-mixed")
                model.save_pretrained(path)
            else:
                checkpoint = tiny_checkpoint(family)
                model, path = checkpoint.model, checkpoint.path
            made[family] = (model, path)
        model, path = made[family]
        if (family, num_stages) not in made:
            out = tmp_path_factory.mktemp(f"{family}-mixed-{num_stages}")
            split_model(path, out, num_stages, progress=False)
            made[family, num_stages] = out
        return model, made[family, num_stages]

    return make


def long_prompts(seed: int = 5) -> list[list[int]]:
    """Three prompts of 27, 13 and 4 tokens (a window is 5 or 8 positions)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, 120) for _ in range(n)] for n in (27, 13, 4)]


def run(parts, prompts, max_new_tokens, *, num_blocks=96, num_window_blocks=24, chunk=4, requeue_after=None,
        native_attention=True, **options):
    """Greedy tokens of ``prompts`` through the split model's stages in this process, each stage with a windowed
    layers' pool of ``num_window_blocks`` blocks, driven step by step by the scheduling policy as the scheduler
    drives it. Also, after every step: each running sequence's (cached tokens, full blocks, windowed blocks) and
    the blocks each pool has given out. ``requeue_after``: after that many steps every sequence is requeued (as
    when a worker is lost) and prefilled again."""
    manifest = Manifest.load(parts)
    window = ModelArgs.from_hf_config(manifest.model_config).mixed_window
    runners = [StageRunner(load_stage(parts, i, manifest=manifest), num_blocks, BLOCK,
                           num_window_blocks=num_window_blocks) for i in range(manifest.num_partitions)]
    for runner in runners:
        runner.cache.native_attention = runner.cache.native_attention and native_attention
    pipeline = LocalPipeline(runners)
    assert pipeline.num_window_blocks == num_window_blocks  # (that of every stage with windowed layers)
    assert any(runner.cache.split for runner in runners)
    allocator, window_allocator = BlockAllocator(num_blocks, BLOCK), BlockAllocator(num_window_blocks, BLOCK)
    policy = SchedulerPolicy(allocator, CharTokenizer(), batching_window_s=0.0, prefill_chunk_tokens=chunk,
                             window_allocator=window_allocator, mixed_window=window, **options)
    ids = [policy.add(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True), 0.0)
           for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    held, in_use, read = [], [], []  # read: the most windowed blocks one sequence's step named
    try:
        while policy.stats.num_running or policy.stats.num_waiting or not held:
            steps, outputs = policy.schedule(0.0)
            assert steps, "nothing to run"
            for step in steps:
                batch = StepBatch.build(list(step.starts), [len(t) for t in step.token_ids], list(step.block_tables),
                                        BLOCK, list(step.window_tables))
                result = pipeline.submit(MicroBatch(step.id, padded(step.token_ids), batch, list(step.sampling)))
                outputs += policy.complete(step.id, result.result(timeout=60))
                held.append([(s.id, s.num_cached, len(s.blocks), len(s.window_blocks)) for s in policy._running])
                read.append(max(len(set(table)) for table in step.window_tables))
                in_use.append((num_blocks - allocator.num_free, num_window_blocks - window_allocator.num_free))
                if len(held) == requeue_after:
                    assert policy.requeue_all() > 0
            for sequence_id, event in outputs:
                assert event.error is None, event.error
                tokens[sequence_id] += event.token_ids
    finally:
        pipeline.close()
    assert allocator.num_free == num_blocks and window_allocator.num_free == num_window_blocks  # all came back
    run.read = read
    return [tokens[i] for i in ids], held, in_use, window


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_stages", [1, 2])
def test_windowed_blocks_slide_and_the_tokens_are_transformers(family, num_stages, mixed):
    """Greedy tokens equal transformers' generate; each sequence holds its whole length in the full layers' pool
    but in the windowed pool only what its window and a chunk of 4 span, and that pool never holds more than the
    sequences' windows at once: less than their lengths."""
    model, parts = mixed(family, num_stages)
    prompts = long_prompts()
    expected = _greedy_reference(model, prompts, 30)
    got, held, in_use, window = run(parts, prompts, 30)
    assert got == expected
    span = (window + 4 - 2) // BLOCK + 2  # a chunk of 4 tokens (decode steps span less)
    for step in held:
        for i, _, full, windowed in step:
            assert windowed <= span
            assert full == -(-(len(prompts[i]) + 30) // BLOCK)  # the full layers' blocks: its whole length
    decoding = [windowed for step in held for _, cached, _, windowed in step if cached > 27]
    assert decoding and max(decoding) <= (window - 1) // BLOCK + 2  # a decode step's window
    assert max(w for _, w in in_use) <= 3 * span < max(f for f, _ in in_use)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_on_the_gathered_path_too_and_without_chunks(family, mixed):
    """Decode steps on torch's gathered path (no attention kernel), and prompts prefilled whole (their window spans
    them: the windowed pool must hold them) give the same tokens."""
    model, parts = mixed(family, 2)
    prompts = long_prompts()
    expected = _greedy_reference(model, prompts, 20)
    assert run(parts, prompts, 20, native_attention=False)[0] == expected
    got, held, _, window = run(parts, prompts, 20, chunk=None, num_window_blocks=40)
    assert got == expected
    assert max(run.read) == -(-27 // BLOCK)  # the long prompt's step named all of its blocks...
    assert max(w for step in held for *_, w in step) <= (window - 1) // BLOCK + 2  # ...given back after it


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_a_requeue_prefills_both_tables_again(family, mixed):
    """Every sequence requeued mid-generation (a lost worker) gives both pools' blocks back and is prefilled again
    into fresh ones: the tokens are the same."""
    model, parts = mixed(family, 2)
    prompts = long_prompts()
    got, held, _, _ = run(parts, prompts, 24, requeue_after=25)
    assert got == _greedy_reference(model, prompts, 24)
    assert len(held) > 25


def test_a_request_longer_than_one_pool_holds_now_runs(mixed):
    """The same budget: one pool for every layer of Gemma 3's stage holds 40 blocks of 2 tokens (80 positions);
    split, its 2 full layers hold 77 blocks and its 3 windowed ones 15: a prompt of 27 tokens with 100 new ones
    (127 positions) now runs and gives transformers' tokens; one pool refuses it."""
    from chatloop.stage.runner import StageSpec, kv_blocks, kv_pools

    model, parts = mixed("gemma3_text", 1)
    manifest = Manifest.load(parts)
    args = ModelArgs.from_hf_config(manifest.model_config)
    layers = manifest.partitions[0].layers
    block_bytes = 2 * BLOCK * args.num_kv_heads * args.head_dim * 4  # one layer's keys and values
    spec = StageSpec(name="stage0", index=0, directory=str(parts), kv_cache_mb=200 * block_bytes / 2**20,
                     block_size=BLOCK, min_capacity_tokens=16, window_blocks=15)
    one_pool = kv_blocks(spec, args, len(layers))
    num_full, num_window = kv_pools(spec, args, layers)
    assert (one_pool, num_full, num_window) == (40, (200 - 3 * 15) // 2, 15)
    prompt = long_prompts()[0]
    policy = SchedulerPolicy(BlockAllocator(one_pool, BLOCK), CharTokenizer(), max_context=256)
    with pytest.raises(ContextLengthError, match="exceeds the KV cache's 80 tokens"):
        policy.add(prompt, SamplingParams(max_new_tokens=100), 0.0)
    got, _, in_use, _ = run(parts, [prompt], 100, num_blocks=num_full, num_window_blocks=num_window)
    assert got == _greedy_reference(model, [prompt], 100)
    assert max(f for f, _ in in_use) == -(-127 // BLOCK) > one_pool


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_ngram_speculation_and_chunked_prefill_keep_the_greedy_tokens(family, mixed):
    """Through the scheduler: n-gram drafts verified over the windowed pool (rejected drafts lie past the window
    table's end and are overwritten), prompts prefilled in chunks of 3; the tokens equal plain decoding's and
    transformers'."""
    from test_speculation import run as run_scheduler

    from chatloop.engine.scheduler import Scheduler

    model, parts = mixed(family, 2)
    rng = random.Random(2)
    base = [rng.randrange(2, 120) for _ in range(6)]
    prompts = [base * 3 + [7, 9], base * 2 + base[:4]]  # repeats: n-gram drafts get accepted, and rejected
    expected = _greedy_reference(model, prompts, 24)
    window = ModelArgs.from_hf_config(Manifest.load(parts).model_config).mixed_window
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.0)] * 2
    for options in ({}, {"speculative_method": "ngram", "num_speculative_tokens": 4}):
        manifest = Manifest.load(parts)
        pipeline = LocalPipeline([StageRunner(load_stage(parts, i, manifest=manifest), 64, BLOCK,
                                              num_window_blocks=20) for i in range(manifest.num_partitions)])
        scheduler = Scheduler(pipeline, CharTokenizer(), batching_window_ms=0, max_batch_size=4,
                              prefill_chunk_tokens=3, mixed_window=window, **options)
        try:
            assert scheduler.window_allocator is not None and scheduler.policy.prefix_caching
            results = run_scheduler(scheduler, prompts, params)
            assert [tokens for tokens, _ in results] == expected
            assert scheduler.allocator.num_free == 64 and scheduler.window_allocator.num_free == 20
            if options:
                assert scheduler.stats.drafted_tokens > 0
        finally:
            scheduler.close()
            pipeline.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chats_next_turn_starts_from_both_pools_cached_blocks_and_its_tokens_are_transformers(family, mixed):
    """A chat's second turn (the first's prompt and answer, and more) sent after the first ended, over two stages
    with the windowed pool, prefill chunks of 3 and the prefix cache: it starts after the shared blocks, far past the
    window (the windowed pool gave the blocks of the window before them back, cached), and its greedy tokens equal
    transformers' on the whole conversation; every block of both pools comes back."""


    model, parts = mixed(family, 2)
    window = ModelArgs.from_hf_config(Manifest.load(parts).model_config).mixed_window
    manifest = Manifest.load(parts)
    pipeline = LocalPipeline([StageRunner(load_stage(parts, i, manifest=manifest), 64, BLOCK, num_window_blocks=24)
                              for i in range(manifest.num_partitions)])
    history, second, tokens, last = two_turns(pipeline, mixed_window=window)
    assert tokens == _greedy_reference(model, [second], 8)[0]
    assert last.cached_tokens >= len(history) - BLOCK > window  # (its last full block of known tokens)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_every_position_a_step_reads_is_where_it_was_written_in_its_table(seed, prefix_caching):
    """The policy alone, random windows, block sizes, chunks, lengths, accepted drafts and rope switches (a sequence
    computed again from its first token takes fresh windowed blocks): every position a token of
    a step reads is in the block its table names and holds what the same sequence wrote there (the full table every
    position before it, the window table those of its window); each sequence holds no more windowed blocks than
    admission counted, and every block of both pools comes back."""
    rng = random.Random(seed)
    window, size = rng.randint(1, 9), rng.randint(1, 4)
    chunk = rng.choice([1, 3, 7])
    k = rng.choice([0, 2, 4])
    rope_switch = rng.choice([None, rng.randint(2, 30)])  # (computed again from its first token there)
    allocator, window_allocator = BlockAllocator(512, size), BlockAllocator(64, size)
    policy = SchedulerPolicy(allocator, CharTokenizer(), batching_window_s=0.0, prefill_chunk_tokens=chunk,
                             max_batch_size=4, window_allocator=window_allocator, mixed_window=window,
                             speculative_method="ngram" if k else None, num_speculative_tokens=k or 4,
                             rope_switch=rope_switch, prefix_caching=prefix_caching)
    for _ in range(8):
        policy.add([ord("a")] * rng.randint(1, 20), SamplingParams(max_new_tokens=rng.randint(1, 30),
                                                                   ignore_eos=True), 0.0)
    written: dict[tuple[str, int], tuple] = {}  # (pool, block) -> (sequence, logical block) last written

    ended = 0
    while ended < 8:
        steps, outputs = policy.schedule(0.0)
        for step in steps:
            answers = []
            for b, (seq_id, tokens, start, table, window_table) in enumerate(zip(
                    step.sequence_ids, step.token_ids, step.starts, step.block_tables, step.window_tables)):
                drafts = step.num_drafts[b] if step.num_drafts else 0
                end = start + len(tokens) + drafts
                assert len(table) == len(window_table) == -(-end // size)
                seq = policy._by_id[seq_id]
                for p in range(start, end):  # (drafts too: rejected ones are written, then overwritten)
                    written["full", table[p // size]] = written["window", window_table[p // size]] = (seq, p // size)
                for p in range(start, end):
                    for q in range(p + 1):
                        assert same_content(written["full", table[q // size]], seq, q // size, size)
                    for q in range(max(0, p - window + 1), p + 1):
                        assert same_content(written["window", window_table[q // size]], seq, q // size, size), \
                            (seq_id, p, q)
                accepted = rng.randint(0, drafts)
                answers.append(AcceptedTokens((ord("z"),) * (accepted + 1), drafts) if drafts else ord("z"))
            outputs += policy.complete(step.id, answers)
            held = sum(len(s.window_blocks) for s in policy._running)
            assert held + window_allocator.num_free == window_allocator.num_blocks
            assert all(len(s.window_blocks) <= policy._most_window_blocks(s.total_tokens, s.num_draft_tokens)
                       for s in policy._running)
        ended += sum(event.finish_reason is not None for _, event in outputs)
    assert allocator.num_free == allocator.num_blocks and window_allocator.num_free == window_allocator.num_blocks


@pytest.mark.parametrize("seed", range(20))
def test_no_windowed_block_a_step_in_flight_names_is_free_or_another_sequences(seed):
    """The policy as a pipeline drives it: up to 3 steps in flight, completed in any order, cancels, a lost step
    requeued, the whole pipeline lost: while a step is out, no block of its window tables' live entries (from its
    first token's window on) is free in the windowed pool or held by another sequence (its stages still write and
    read them), and every block of both pools comes back."""
    rng = random.Random(seed)
    window, size = rng.randint(1, 9), rng.randint(1, 4)
    k = rng.choice([0, 2, 4])
    allocator, window_allocator = BlockAllocator(512, size), BlockAllocator(80, size)
    policy = SchedulerPolicy(allocator, CharTokenizer(), batching_window_s=0.0,
                             prefill_chunk_tokens=rng.choice([1, 3, 7]), max_batch_size=5, max_in_flight=3,
                             window_allocator=window_allocator,
                             mixed_window=window, speculative_method="ngram" if k else None,
                             num_speculative_tokens=k or 4, rope_switch=rng.choice([None, rng.randint(2, 30)]))
    ids = [policy.add([ord("a")] * rng.randint(1, 20), SamplingParams(max_new_tokens=rng.randint(1, 30),
                                                                      ignore_eos=True), 0.0) for _ in range(10)]
    out: list = []
    for _ in range(5000):
        if not (policy._running or policy._waiting):
            break
        steps, _ = policy.schedule(0.0)
        out += steps
        free = set(window_allocator._free)
        holder = {block: s.id for s in policy._running for block in s.window_blocks}
        for step in out:
            for seq_id, start, table in zip(step.sequence_ids, step.starts, step.window_tables):
                for block in set(table[max(0, start - window + 1) // size:]):
                    assert block not in free and holder.get(block, seq_id) == seq_id, (step.id, seq_id, block)
        if not out:
            continue
        if rng.random() < 0.05:
            policy.cancel(rng.choice(ids))
        step = out.pop(rng.randrange(len(out)) if rng.random() < 0.5 else 0)
        if rng.random() < 0.03:
            policy.requeue_step(step.id, 0.0)
        elif rng.random() < 0.01:
            policy.requeue_all()
            out.clear()
        else:
            drafts = step.num_drafts or (0,) * len(step.sequence_ids)
            policy.complete(step.id, [AcceptedTokens((ord("z"),) * (rng.randint(0, d) + 1), d) if d else ord("z")
                                      for d in drafts])
    assert not (policy._running or policy._waiting), "the requests did not finish"
    assert allocator.num_free == allocator.num_blocks and window_allocator.num_free == window_allocator.num_blocks


def test_the_kv_budget_is_split_once_for_every_stage():
    """kv_pools gives the windowed pool what the coordinator asks (no more than an even split), the full layers the
    rest; a stage without windowed layers keeps one pool; the pipeline takes the smallest of each."""
    from chatloop.engine.pipeline import smallest_window_pool
    from chatloop.models import LayerRange
    from chatloop.stage.runner import CapacityError, StageSpec, kv_pools

    args = ModelArgs.from_hf_config(dict(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True,
        sliding_window=8, max_window_layers=1))
    assert args.mixed_window == 8 and args.kv_window is None
    layer_bytes = 2 * 16 * 2 * 16 * 4  # one layer's block: keys and values, 16 tokens, 2 heads of 16, float32
    spec = StageSpec(name="w", index=0, directory=".", kv_cache_mb=100 * layer_bytes / 2**20, block_size=16,
                     min_capacity_tokens=16, window_blocks=10)
    assert kv_pools(spec, args, LayerRange(0, 1)) == ((100 - 10) // 1, 10)  # layer 0 full, layer 1 windowed
    assert kv_pools(spec, args, LayerRange(2, 3)) == (100, 10)  # no full layer: limits nothing
    assert kv_pools(StageSpec(**{**spec.__dict__, "window_blocks": 80}), args, LayerRange(3, 3)) == (100, 80)
    assert kv_pools(spec, args, LayerRange(0, 3)) == (100 - 30, 10)
    assert kv_pools(StageSpec(**{**spec.__dict__, "window_blocks": 80}), args, LayerRange(0, 1)) == (50, 50)
    assert kv_pools(StageSpec(**{**spec.__dict__, "window_blocks": 0}), args, LayerRange(0, 1)) == (50, 0)
    unwindowed = ModelArgs.from_hf_config(dict(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    assert kv_pools(spec, unwindowed, LayerRange(0, 1)) == (50, 0)  # no window: one pool
    with pytest.raises(CapacityError, match="raise cache.kv_cache_mb"):
        kv_pools(StageSpec(**{**spec.__dict__, "min_capacity_tokens": 95 * 16}), args, LayerRange(0, 1))
    assert smallest_window_pool([0, 12, 10]) == 10 and smallest_window_pool([0, 0]) == 0


def _gemma3_engine(tiny_checkpoint, tmp_path, new_tokens: int):
    """A tiny Gemma 3 folder with a tokenizer, a long prompt, transformers' greedy tokens for it, and the overrides of
    two in-process stages with a small pool and prefill chunks."""
    import shutil

    from tests.conftest import save_tiny_tokenizer

    checkpoint = tiny_checkpoint("gemma3_text")
    folder = tmp_path / "model"
    shutil.copytree(checkpoint.path, folder)
    save_tiny_tokenizer(folder)
    prompt = long_prompts()[0]
    expected = _greedy_reference(checkpoint.model, [prompt], new_tokens)[0]
    overrides = ["cluster=single", "cluster.num_workers=2", f"model.name={folder}",
                 f"model.partitions_dir={tmp_path / 'parts'}", "cache.kv_cache_mb=1", "cache.min_capacity_tokens=64",
                 "cache.block_size=4", "batching.prefill_chunk_tokens=8"]
    return folder, prompt, expected, overrides


def test_the_engine_splits_gemmas_pools_and_its_draft_model_keeps_one(tiny_checkpoint, tmp_path):
    """ChatLoop.start on Gemma 3 over two in-process stages with prefill chunks: the stages keep the windowed layers'
    own pool, and the greedy tokens are transformers' with and without a draft model (the same checkpoint, loaded
    with one pool: its block tables index all of its layers); the second request starts from the first's cached
    blocks in both pools."""
    from chatloop import ChatLoop, load_config

    folder, prompt, expected, common = _gemma3_engine(tiny_checkpoint, tmp_path, 24)
    overrides = [*common, "speculative=draft",
                 f"speculative.draft_model={folder}", "speculative.draft_quantization=null", "speculative.num_tokens=3",
                 "speculative.draft_kv_cache_mb=1"]
    with ChatLoop.start(load_config(overrides)) as llm:
        assert llm.pipeline.num_window_blocks == 16 * ((8 + 8 - 2) // 4 + 2)  # max_batch_size x a window and a chunk
        assert llm.scheduler.window_allocator is not None and llm.scheduler.policy.prefix_caching
        assert not llm.scheduler.proposers["draft"].cache.split
        drafted = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)
        plain = llm.generate(prompt, max_new_tokens=24, ignore_eos=True, speculative_tokens=0)
        stats = llm.stats()
    assert stats.kv_window_blocks_total == llm.pipeline.num_window_blocks and stats.kv_window_blocks_used == 0
    assert stats.kv_blocks_used == 0
    assert drafted.token_ids == plain.token_ids == expected
    assert drafted.drafted_tokens > 0 and plain.cached_tokens > 0 and stats.prefix_cache_hits == plain.cached_tokens
    from chatloop.serving.health import HealthReport
    from chatloop.serving.status import build_status, format_cache

    busy = replace(stats, kv_window_blocks_free=stats.kv_window_blocks_total - 7)
    status = build_status(busy, HealthReport([], 0.0), model="m")
    assert "windowed layers' pool: 7 blocks used of 80" in format_cache(status)


def test_window_pool_off_keeps_one_pool_and_the_prefix_cache(tiny_checkpoint, tmp_path):
    """cache.window_pool=false: Gemma 3 with prefill chunks keeps one pool and its prefix cache (a second request
    sharing the prompt reuses its blocks), and the greedy tokens stay transformers'."""
    from chatloop import ChatLoop, load_config

    _, prompt, expected, common = _gemma3_engine(tiny_checkpoint, tmp_path, 12)
    overrides = [*common, "cache.window_pool=false"]
    with ChatLoop.start(load_config(overrides)) as llm:
        assert llm.pipeline.num_window_blocks == 0 and llm.scheduler.window_allocator is None
        assert llm.scheduler.policy.prefix_caching
        first = llm.generate(prompt, max_new_tokens=12, ignore_eos=True)
        again = llm.generate(prompt, max_new_tokens=12, ignore_eos=True)
        stats = llm.stats()
    assert first.token_ids == again.token_ids == expected
    assert stats.prefix_cache_hits > 0


def test_a_rebuilt_pipeline_with_another_windowed_pool_gets_a_fresh_window_allocator():
    """After a lost pipeline every sequence is requeued: the scheduler takes the new pipeline's pool sizes (both), and
    the requeued request finishes on it; a rebuilt pipeline without the windowed pool is refused, not run wrong."""
    import queue

    from test_policy import InstantPipeline

    from chatloop.engine.scheduler import Scheduler

    def pipeline(num_window_blocks: int) -> InstantPipeline:
        p = InstantPipeline()
        p.num_window_blocks = num_window_blocks
        return p

    first = pipeline(12)
    with pytest.raises(ValueError, match="pass the model's mixed_window"):  # its steps would carry no window tables
        Scheduler(first, CharTokenizer())
    scheduler = Scheduler(first, CharTokenizer(), batching_window_ms=0, mixed_window=5, prefill_chunk_tokens=4)
    events: queue.Queue = queue.Queue()
    try:
        assert scheduler.window_allocator.num_blocks == 12
        scheduler.suspend("worker1 was lost")
        scheduler.submit([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True), events.put)
        scheduler.resume(pipeline(20))
        assert scheduler.policy.window_allocator is scheduler.window_allocator
        assert scheduler.window_allocator.num_blocks == 20
        got = [events.get(timeout=10) for _ in range(3)]
        assert got[-1].finish_reason is not None and scheduler.window_allocator.num_free == 20
        scheduler.suspend("worker1 was lost")
        kept = scheduler.pipeline
        with pytest.raises(ValueError, match="no windowed layers' pool"):
            scheduler.resume(pipeline(0))
        assert scheduler.pipeline is kept  # refused before anything changed: a good pipeline may still resume it
        scheduler.resume(pipeline(20))
        scheduler.submit([1, 2], SamplingParams(max_new_tokens=2, ignore_eos=True), events.put)
        assert [events.get(timeout=10) for _ in range(2)][-1].finish_reason is not None
    finally:
        scheduler.close()
