"""Sliding attention windows (issue 20): Mistral's (every layer), Qwen2's and Qwen3's (``use_sliding_window``, the
layers from ``max_window_layers`` on) against transformers, and the KV blocks that fall out of the window going back
to the pool.

Tiny random checkpoints written by transformers' own classes, windows of 5 and 6 positions: the prompts (11 and 6
tokens) and the 16 decode steps after them run past the window, so a window ignored (or applied where it is not)
fails the goldens, which transformers' own output with the window and without it is checked to tell apart.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_golden import check_against_reference, load_with_linear_mode, reference_logits, tiny_prompts

from chatloop.models import ModelArgs
from chatloop.partition.splitter import split_model
from tests.conftest import TINY_VOCAB, randomize_weights

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
WINDOWED = {
    # every layer windowed
    "mistral": ("MistralConfig", dict(sliding_window=5, tie_word_embeddings=False)),
    # layers 1-3 windowed: the first stage of two holds a full layer and a windowed one
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                  tie_word_embeddings=True, rope_theta=1e6)),
    # layers 2-3 windowed: one stage of two full, the other windowed
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=2, head_dim=32,
                                  tie_word_embeddings=False, rope_theta=1e6)),
}
WINDOWED_LAYERS = {"mistral": None, "qwen2": ("full_attention",) + ("sliding_attention",) * 3,
                   "qwen3": ("full_attention",) * 2 + ("sliding_attention",) * 2}


def tiny_model(family: str, window: bool = True, seed: int = 0):
    """A tiny random model whose every weight matters (see tests/conftest.py ``build_tiny_model``)."""
    import transformers

    name, options = WINDOWED[family]
    options = dict(options)
    if not window:
        options.pop("use_sliding_window", None)
        options["sliding_window"] = None
    torch.manual_seed(seed)
    return randomize_weights(transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, name)(**COMMON, **options), dtype=torch.float32))


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """``windowed(family, num_stages)``: (transformers model, split folder), each made once per module."""
    models, splits = {}, {}

    def make(family: str, num_stages: int = 1):
        if family not in models:
            path = tmp_path_factory.mktemp(f"{family}-windowed")
            models[family] = (tiny_model(family), path)
            models[family][0].save_pretrained(path)
        model, path = models[family]
        if (family, num_stages) not in splits:
            out = tmp_path_factory.mktemp(f"{family}-{num_stages}")
            split_model(path, out, num_stages, progress=False)
            splits[family, num_stages] = out
        return model, splits[family, num_stages]

    return make


@pytest.mark.parametrize("family", list(WINDOWED))
def test_windows_are_read_as_transformers_reads_them(family, windowed, tmp_path):
    model, _ = windowed(family)
    model.config.save_pretrained(tmp_path)
    args = ModelArgs.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert args.sliding_window == WINDOWED[family][1]["sliding_window"]
    assert args.layer_types == WINDOWED_LAYERS[family]
    hf_types = getattr(model.config, "layer_types", None)
    if family != "mistral":
        assert tuple(hf_types) == WINDOWED_LAYERS[family]
    assert args.kv_window == (5 if family == "mistral" else None)


@pytest.mark.parametrize("family", list(WINDOWED))
def test_transformers_reference_applies_the_window(family):
    """What the goldens compare against really attends within the window: without it the logits differ."""
    prompts, continuations = tiny_prompts()
    with_window, without = tiny_model(family), tiny_model(family, window=False)
    without.load_state_dict(with_window.state_dict())
    a = reference_logits(with_window, prompts[0], continuations[0])
    b = reference_logits(without, prompts[0], continuations[0])
    window = WINDOWED[family][1]["sliding_window"]
    assert torch.equal(a[:window], b[:window])  # within the window the two agree...
    assert (a[window:] - b[window:]).abs().max() > 1e-2  # ...past it they do not


@pytest.mark.parametrize("family", list(WINDOWED))
@pytest.mark.parametrize("num_stages", [1, 2])
@pytest.mark.parametrize("mode", ["plain", "kernel"])
def test_prefill_and_decode_past_the_window_match_transformers(family, num_stages, mode, windowed, load_pipeline):
    """Float32 prefill (padded batch of 11 and 6 tokens) and 16 decode steps, windows of 5 and 6."""
    model, parts = windowed(family, num_stages)
    pipeline = load_with_linear_mode(load_pipeline, parts, mode, block_size=4, num_blocks=32)
    prompts, continuations = tiny_prompts()
    worst = check_against_reference(pipeline, model, prompts, continuations)
    print(f"{family} over {num_stages} stages ({mode}): max abs logit diff {worst:.2e}")


@pytest.mark.parametrize("family", list(WINDOWED))
def test_the_goldens_fail_without_the_window(family, windowed, load_pipeline):
    model, parts = windowed(family, 2)
    pipeline = load_pipeline(parts, block_size=4, num_blocks=32)
    assert any(cache.window is not None for cache in pipeline.caches)
    for cache in pipeline.caches:
        cache.window = None
    prompts, continuations = tiny_prompts()
    with pytest.raises(AssertionError, match="prefill|decode step"):
        check_against_reference(pipeline, model, prompts, continuations)


def test_qwen_configs_without_layer_types_window_the_layers_from_max_window_layers():
    """Configs written before transformers 5 name no layer_types: layers i >= max_window_layers are windowed."""
    config = dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=256, use_sliding_window=True, sliding_window=8,
                  max_window_layers=3)
    args = ModelArgs.from_hf_config(config)
    assert args.layer_types == ("full_attention",) * 3 + ("sliding_attention",) and args.sliding_window == 8
    assert args.kv_window is None  # a full layer reads every block
    every = ModelArgs.from_hf_config({**config, "max_window_layers": 0})
    assert every.layer_types is None and every.sliding_window == every.kv_window == 8
    for unwindowed in ({"max_window_layers": 4}, {"sliding_window": 256}, {"sliding_window": None},
                       {"use_sliding_window": False, "layer_types": ["sliding_attention"] * 4}):
        args = ModelArgs.from_hf_config({**config, **unwindowed})
        assert args.sliding_window is None and args.layer_types is None and args.kv_window is None
    mistral = ModelArgs.from_hf_config({**config, "model_type": "mistral", "use_sliding_window": False})
    assert mistral.sliding_window == mistral.kv_window == 8 and mistral.layer_types is None
    with pytest.raises(ValueError, match="layer_types must give"):
        ModelArgs.from_hf_config({**config, "model_type": "qwen3", "layer_types": ["sliding_attention"] * 3})


# --- KV blocks out of the window go back to the pool ------------------------------------------------------------


def _generate(parts, kv_window, prompts, max_new_tokens, block_size=2, num_blocks=64, **options):
    """Greedy tokens of ``prompts`` through the split model's stages in this process, driven by the scheduling
    policy step by step as the scheduler does; also, after every step, each running sequence's (cached tokens,
    blocks held) and the blocks the pool has given out."""
    from test_policy import CharTokenizer

    from chatloop.engine.blocks import BlockAllocator
    from chatloop.engine.pipeline import LocalPipeline, MicroBatch
    from chatloop.engine.policy import SchedulerPolicy
    from chatloop.engine.requests import SamplingParams
    from chatloop.models import StepBatch
    from chatloop.models.batch import padded
    from chatloop.partition import Manifest, load_stage
    from chatloop.stage import StageRunner

    manifest = Manifest.load(parts)
    runners = [StageRunner(load_stage(parts, i, manifest=manifest), num_blocks, block_size)
               for i in range(manifest.num_partitions)]
    pipeline = LocalPipeline(runners)
    allocator = BlockAllocator(num_blocks, block_size)
    policy = SchedulerPolicy(allocator, CharTokenizer(), batching_window_s=0.0, kv_window=kv_window, **options)
    ids = [policy.add(p, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True), 0.0)
           for p in prompts]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    held, in_use = [], []
    try:
        while policy.stats.num_running or policy.stats.num_waiting or not held:
            steps, outputs = policy.schedule(0.0)
            assert steps, "nothing to run"
            for step in steps:
                batch = StepBatch.build(list(step.starts), [len(t) for t in step.token_ids], list(step.block_tables),
                                        block_size)
                result = pipeline.submit(MicroBatch(step.id, padded(step.token_ids), batch, list(step.sampling)))
                outputs += policy.complete(step.id, result.result(timeout=60))
                held.append([(s.id, s.num_cached, len(s.blocks)) for s in policy._running])
                in_use.append(num_blocks - allocator.num_free)
            for sequence_id, event in outputs:
                assert event.error is None, event.error
                tokens[sequence_id] += event.token_ids
    finally:
        pipeline.close()
    assert allocator.num_free == num_blocks  # every block came back
    return [tokens[i] for i in ids], held, in_use


def _greedy_reference(model, prompts, max_new_tokens):
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
            out.append(generated[0, len(prompt):].tolist())
    return out


@pytest.mark.parametrize("chunk", [None, 4])
def test_blocks_out_of_the_window_go_back_to_the_pool(chunk, windowed):
    """Mistral (window 5 on every layer, blocks of 2), 40 greedy tokens after prompts of 11 and 6 tokens: each
    sequence holds at most (5 - 1) // 2 + 2 = 4 blocks once its prompt is in, instead of up to 26, and the tokens
    are transformers' own."""
    model, parts = windowed("mistral", 2)
    prompts = tiny_prompts()[0]
    expected = _greedy_reference(model, prompts, 40)
    got, held, in_use = _generate(parts, 5, prompts, 40, prefill_chunk_tokens=chunk)
    assert got == expected
    decoding = [blocks for step in held for _, cached, blocks in step if cached >= 11]
    assert decoding and max(decoding) <= 4
    assert max(in_use[-20:]) <= 2 * 4  # both sequences decoding past their windows
    # without the window the same run holds every block of each sequence's length
    _, held, in_use = _generate(parts, None, prompts, 40, prefill_chunk_tokens=chunk)
    assert max(in_use) == 26 + 23


def test_a_chats_next_turn_under_a_window_starts_from_the_cached_window_and_its_tokens_are_transformers(windowed):
    """Mistral (window 5 on every layer, blocks of 2) over two stages with prefill chunks of 3 and the prefix cache:
    a chat's second turn (the first's prompt and answer, and more), sent after the first ended, skips the shared
    blocks, far past the window (the blocks out of the window went back still cached), holding only its window's;
    its greedy tokens equal transformers' on the whole conversation, and every block comes back."""


    from chatloop.engine.pipeline import LocalPipeline
    from chatloop.partition import Manifest, load_stage
    from chatloop.stage import StageRunner

    model, parts = windowed("mistral", 2)
    manifest = Manifest.load(parts)
    pipeline = LocalPipeline([StageRunner(load_stage(parts, i, manifest=manifest), 12, 2)
                              for i in range(manifest.num_partitions)])
    history, second, tokens, last = two_turns(pipeline, kv_window=5, max_context=256)
    assert tokens == _greedy_reference(model, [second], 8)[0]
    assert last.cached_tokens >= len(history) - 2 > 12 * 2  # more than the pool holds at once


def two_turns(pipeline, **options) -> tuple[list[int], list[int], list[int], object]:
    """A chat's first turn (21 random tokens, 8 greedy tokens answered) and, after it ended, its second (the first's
    prompt and answer, and 5 more) through ``pipeline`` (closed after) on a Scheduler with prefill chunks of 3, the
    prefix cache and ``options``: (the first turn's prompt and answer, the second's prompt, its tokens, its last
    event). Every block of the scheduler's pools is checked back."""
    import random

    from test_policy import CharTokenizer
    from test_speculation import run as run_scheduler

    from chatloop.engine.requests import SamplingParams
    from chatloop.engine.scheduler import Scheduler

    rng = random.Random(7)
    first = [rng.randrange(2, 120) for _ in range(21)]
    scheduler = Scheduler(pipeline, CharTokenizer(), batching_window_ms=0, max_batch_size=4, prefill_chunk_tokens=3,
                          **options)
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.0)]
    try:
        assert scheduler.policy.prefix_caching
        [(answer, _)] = run_scheduler(scheduler, [first], params)
        second = first + answer + [rng.randrange(2, 120) for _ in range(5)]
        [(tokens, last)] = run_scheduler(scheduler, [second], params)
        assert scheduler.allocator.num_free == scheduler.allocator.num_blocks
        window = scheduler.window_allocator
        assert window is None or window.num_free == window.num_blocks
    finally:
        scheduler.close()
        pipeline.close()
    return first + answer, second, tokens, last


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_speculation_under_a_window_keeps_transformers_greedy_tokens(windowed, prefix_caching):
    """Mistral (window 5 on every layer) over two stages, prefill chunks of 3: greedy tokens with n-gram drafts and
    with the model itself as its draft (every draft accepted; k = 8, 4 a sequence: verify steps of 5 tokens, as
    wide as the window) equal those without and transformers'; drafts were made and accepted, and every block
    comes back (the pool holds a window and a token's drafts a sequence, not its length)."""
    from test_speculation import GREEDY, draft_model, generate, prompts

    model, parts = windowed("mistral", 2)
    batch = prompts(2)
    expected = _greedy_reference(model, batch, GREEDY.max_new_tokens)
    options = dict(kv_window=5, prefill_chunk_tokens=3, prefix_caching=prefix_caching)
    plain, _ = generate(parts, batch, [GREEDY] * 2, **options)
    ngram, s1 = generate(parts, batch, [GREEDY] * 2, speculative_method="ngram", num_speculative_tokens=8, **options)
    same = draft_model(windowed("mistral", 1)[1])
    exact, s2 = generate(parts, batch, [GREEDY] * 2, draft=same, speculative_method="draft",
                         num_speculative_tokens=8, **options)
    same[1].shutdown()
    assert [t for t, _ in plain] == [t for t, _ in ngram] == [t for t, _ in exact] == expected
    assert s1.stats.drafted_tokens > 0 and s2.stats.accepted_tokens == s2.stats.drafted_tokens > 0
    for s in (s1, s2):
        assert s.allocator.num_free == s.allocator.num_blocks


def test_a_model_with_full_layers_gives_no_block_back(windowed):
    """Qwen2 with layer 0 full, on one pool for every layer (no windowed layers' pool: see test_mixed_window.py):
    ModelArgs.kv_window is None, every sequence keeps its whole length's blocks, and the tokens are transformers'
    own (a window's block reuse would have overwritten what layer 0 still reads)."""
    model, parts = windowed("qwen2", 2)
    from chatloop.partition import Manifest

    assert ModelArgs.from_hf_config(Manifest.load(parts).model_config).kv_window is None
    prompts = tiny_prompts()[0]
    got, held, _ = _generate(parts, None, prompts, 30)
    assert got == _greedy_reference(model, prompts, 30)
    assert {(i, blocks) for step in held for i, _, blocks in step} == {(0, (11 + 30) // 2 + 1), (1, 18)}
    forced, _, _ = _generate(parts, 5, prompts, 30)  # its window's blocks reused: layer 0 reads overwritten keys
    assert forced != got


def test_under_a_window_with_prefill_chunks_a_sequence_may_outgrow_the_cache(windowed):
    """12 blocks of 2 hold 24 tokens; under the window of 5 with chunks of 4 a sequence holds at most 5 of them at
    once, so prompts of 11 and 6 tokens generate 40 tokens each (51 and 46 positions), transformers' own."""
    from test_policy import CharTokenizer

    from chatloop.engine.blocks import BlockAllocator
    from chatloop.engine.errors import ContextLengthError
    from chatloop.engine.policy import SchedulerPolicy
    from chatloop.engine.requests import SamplingParams

    model, parts = windowed("mistral", 2)
    prompts = tiny_prompts()[0]
    got, _, in_use = _generate(parts, 5, prompts, 40, num_blocks=12, prefill_chunk_tokens=4)
    assert got == _greedy_reference(model, prompts, 40) and max(in_use) <= 10
    params = SamplingParams(max_new_tokens=40)
    windowed_policy = SchedulerPolicy(BlockAllocator(12, 2), CharTokenizer(), kv_window=5, prefill_chunk_tokens=4,
                                      max_context=256)
    assert windowed_policy.context_length == 256
    for unwindowed in ({"kv_window": None, "prefill_chunk_tokens": 4}, {"kv_window": 5}):  # no window, no chunks
        policy = SchedulerPolicy(BlockAllocator(12, 2), CharTokenizer(), max_context=256, **unwindowed)
        assert policy.context_length == 24
        with pytest.raises(ContextLengthError, match="exceeds the KV cache's 24 tokens"):
            policy.add(prompts[0], params, 0.0)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(40))
def test_the_window_a_step_reads_is_always_in_the_blocks_it_was_written_to(seed, prefix_caching):
    """The policy alone, random windows, block sizes, chunks, lengths and accepted drafts, with the prefix cache
    (prompts share prefixes: blocks out of the window go back cached, and later sequences take over a window's
    blocks) and without (blocks out of the window are written again in place): every position a token of a step
    reads (its window) is in the physical block its table names and holds what the same sequence wrote there, or
    the same tokens' keys and values from a block the cache gave it; each sequence holds no more blocks than
    admission counted, and every block comes back."""
    import random

    from test_policy import CharTokenizer

    from chatloop.engine.blocks import BlockAllocator
    from chatloop.engine.policy import SchedulerPolicy
    from chatloop.engine.requests import AcceptedTokens, SamplingParams

    rng = random.Random(seed)
    window, size = rng.randint(1, 9), rng.randint(1, 4)
    chunk = rng.choice([None, 1, 3, 7])
    k = rng.choice([0, 2, 4])
    allocator = BlockAllocator(64, size)
    policy = SchedulerPolicy(allocator, CharTokenizer(), batching_window_s=0.0, kv_window=window,
                             prefill_chunk_tokens=chunk, max_batch_size=4, prefix_caching=prefix_caching,
                             speculative_method="ngram" if k else None, num_speculative_tokens=k or 4)
    for _ in range(8):
        prompt = [ord("a")] * rng.randint(1, 20)
        policy.add(prompt, SamplingParams(max_new_tokens=rng.randint(1, 30), ignore_eos=True), 0.0)
    written: dict[int, tuple] = {}  # physical block -> (sequence, logical block) last written there
    ended = 0
    while ended < 8:
        steps, outputs = policy.schedule(0.0)
        for step in steps:
            answers = []
            for b, (seq_id, tokens, start, table) in enumerate(zip(step.sequence_ids, step.token_ids, step.starts,
                                                                   step.block_tables)):
                drafts = step.num_drafts[b] if step.num_drafts else 0
                end = start + len(tokens) + drafts  # (drafts too: rejected ones are written, then overwritten)
                assert len(table) == -(-end // size)
                seq = policy._by_id[seq_id]
                for p in range(start, end):
                    written[table[p // size]] = (seq, p // size)
                for p in range(start, end):
                    for q in range(max(0, p - window + 1), p + 1):
                        assert same_content(written[table[q // size]], seq, q // size, size), (seq_id, p, q)
                accepted = rng.randint(0, drafts)
                answers.append(AcceptedTokens((ord("z"),) * (accepted + 1), drafts) if drafts else ord("z"))
            outputs += policy.complete(step.id, answers)
            held = sum(len(s.blocks) for s in policy._running)
            assert held + allocator.num_free == allocator.num_blocks
            assert all(len(s.blocks) <= policy._most_blocks(s.total_tokens, s.num_draft_tokens)
                       for s in policy._running)
        ended += sum(event.finish_reason is not None for _, event in outputs)
    assert allocator.num_free == allocator.num_blocks


def same_content(entry, reader, j: int, size: int) -> bool:
    """Logical block ``j`` of sequence ``reader`` holds what ``entry`` (writer, its logical block) wrote: its own, or
    a full block of the same tokens (from the first) that the prefix cache gave it."""
    writer, written_j = entry
    if (writer.id, written_j) == (reader.id, j):
        return True
    known = [list(s.prompt_ids + s.output_ids)[: (j + 1) * size] for s in (writer, reader)]
    return written_j == j and len(known[0]) == (j + 1) * size and known[0] == known[1]


# --- windowed decode steps on the attention kernel --------------------------------------------------------------


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3_text"])
def test_windowed_decode_steps_attend_on_the_kernel_as_the_gathered_path_does(family, windowed, tiny_checkpoint,
                                                                              load_pipeline, tmp_path):
    """Past the window, decode steps attend on the kernel from each token's window start (windowed layers only:
    Gemma 3's and Qwen2's full layers read every position), layer by layer (the one-call step has no window), and
    give transformers' logits and those of torch's gathered path with the window's mask."""
    from chatloop.models.kv_cache import PagedKVCache

    if family == "gemma3_text":  # layers 1 and 4 full, the others windowed (8)
        checkpoint = tiny_checkpoint(family)
        model, parts = checkpoint.model, tmp_path
        split_model(checkpoint.path, parts, 2, progress=False)
    else:
        model, parts = windowed(family, 2)

    def load(native_attention: bool):
        pipeline = load_with_linear_mode(load_pipeline, parts, "kernel", block_size=4, num_blocks=32)
        for cache in pipeline.caches:
            cache.native_attention = native_attention
        return pipeline

    prompts, continuations = tiny_prompts()
    seen = []  # (layer, its window starts or None) of each attention on the kernel
    original = PagedKVCache.decode_attention

    def spy(self, layer, q):
        windowed_layer = self.window is not None and (self.windowed_layers is None or layer in self.windowed_layers)
        seen.append((layer, self.window_starts if windowed_layer else None))
        return original(self, layer, q)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PagedKVCache, "decode_attention", spy)
        check_against_reference(load(True), model, prompts, continuations)
    full = {"mistral": set(), "qwen2": {0}, "gemma3_text": {1, 4}}[family]
    cut = {layer for layer, starts in seen if starts is not None and int(starts.max()) > 0}
    assert cut == set(range(len(model.model.layers))) - full  # every windowed layer, once past its window
    assert all(starts is None for layer, starts in seen if layer in full)
    kernel, gathered = load(True), load(False)
    torch.testing.assert_close(kernel.prefill(prompts), gathered.prefill(prompts), atol=1e-4, rtol=0)
    for step in range(len(continuations[0])):
        tokens = [c[step] for c in continuations]
        torch.testing.assert_close(kernel.decode(tokens), gathered.decode(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_window_span_blocks_is_the_most_blocks_any_step_touches(block_size: int) -> None:
    """The bound the policy reserves and the runner sizes pools by: over every position a step of T tokens can start
    at, the blocks its window and its tokens span (first read, (p - W + 1) // size, to last written) never pass it,
    and reach it or fall one short (where block_size divides W + T - 2)."""
    from chatloop.engine.blocks import window_span_blocks

    for window in (1, 3, 16, 33):
        for step in (1, 2, 5, 40):
            spans = [(p + step - 1) // block_size - max(p - window + 1, 0) // block_size + 1
                     for p in range(0, 4 * (window + step + block_size))]
            bound = window_span_blocks(window, step, block_size)
            assert max(spans) <= bound, (window, step)
            assert max(spans) == bound - ((window + step - 2) % block_size == 0), (window, step)
