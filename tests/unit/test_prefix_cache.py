"""Prefix caching: the allocator's hash chain, holders and eviction; the policy's reuse of cached blocks (fake model,
fake clock); and in one process, greedy tokens and logprobs with the cache on equal those with it off."""

from __future__ import annotations

import queue
import threading

import pytest
from test_policy import EOS, CharTokenizer, InstantPipeline, Run, make_policy, params, text_ids

from chatloop import ChatLoop
from chatloop.engine import BlockAllocator, FinishReason, Scheduler, SchedulerPolicy, Step
from chatloop.engine.blocks import block_hash

# ---- the allocator ------------------------------------------------------------------------------------------------


def chain(*blocks: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    for tokens in blocks:
        hashes.append(block_hash(hashes[-1] if hashes else None, tokens))
    return hashes


def test_a_block_hash_covers_its_tokens_and_every_token_before():
    a, b = chain([1, 2], [3, 4])
    assert a == block_hash(None, [1, 2]) and len(a) == 32
    assert b != block_hash(None, [3, 4])  # the same tokens after another prefix are another block
    assert chain([1, 2], [3, 4]) != chain([1, 5], [3, 4])
    assert chain([1, 2], [3, 4])[1] != chain([1, 2], [3, 5])[1]
    assert block_hash(None, [1 << 40]) != block_hash(None, [0])  # ids are not truncated


def test_cached_blocks_outlive_their_holder_count_as_free_and_are_found_by_their_chain():
    allocator = BlockAllocator(num_blocks=6, block_size=2)
    blocks = allocator.take(3)
    hashes = chain([1, 2], [3, 4])
    assert [allocator.cache(b, h) for b, h in zip(blocks, hashes)] == [True, True]
    allocator.free(blocks)
    assert allocator.num_free == 6 and allocator.num_cached == 2
    assert allocator.lookup(hashes) == blocks[:2]
    assert allocator.lookup([hashes[0], block_hash(hashes[0], [3, 9])]) == blocks[:1]  # up to the first miss
    assert allocator.lookup(chain([9, 9], [3, 4])) == []  # a block is found only after its own prefix
    assert allocator.take(4) is not None and allocator.num_cached == 2  # empty blocks go first: nothing evicted


def test_a_shared_block_goes_back_when_its_last_holder_lets_go():
    allocator = BlockAllocator(num_blocks=3, block_size=2)
    (block,) = allocator.take(1)
    allocator.cache(block, chain([1, 2])[0])
    allocator.share([block])  # a second sequence
    allocator.free([block])
    assert allocator.num_free == 2 and allocator.num_unheld([block]) == 0
    allocator.free([block])
    assert allocator.num_free == 3 and allocator.num_unheld([block]) == 1
    allocator.share([block])  # found again: held, no longer free
    assert allocator.num_free == 2
    allocator.free([block])
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free([block])


def test_eviction_takes_the_least_recently_used_unheld_blocks_last_block_first():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    a, b = allocator.take(2), allocator.take(2)
    ha, hb = chain([1, 2], [3, 4]), chain([5, 6], [7, 8])
    for blocks, hashes in ((a, ha), (b, hb)):
        for block, h in zip(blocks, hashes):
            allocator.cache(block, h)
    allocator.free(a)
    allocator.free(b)
    allocator.share(allocator.lookup(ha))  # a is used again: b is now the least recently used
    allocator.free(a)
    (taken,) = allocator.take(1)
    assert taken == b[1] and allocator.evictions == 1  # a prefix's last block goes first
    assert allocator.lookup(hb) == b[:1] and allocator.lookup(ha) == a
    allocator.free([taken])
    assert allocator.num_free == 4 and allocator.num_cached == 3


def test_a_content_cached_twice_keeps_the_first_block():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    first, second = allocator.take(2)
    h = chain([1, 2])[0]
    assert allocator.cache(first, h) and not allocator.cache(second, h)
    allocator.free([first, second])
    assert allocator.lookup([h]) == [first] and allocator.num_cached == 1


def test_clearing_the_cache_forgets_every_block_and_held_ones_come_back_empty():
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    held, unheld = allocator.take(1), allocator.take(1)
    hashes = chain([1, 2], [3, 4])
    allocator.cache(held[0], hashes[0])
    allocator.cache(unheld[0], hashes[1])
    allocator.free(unheld)
    assert allocator.clear_cache() == 2
    assert allocator.lookup(hashes) == [] and allocator.num_cached == 0 and allocator.num_free == 3
    allocator.free(held)
    assert allocator.num_free == 4 and allocator.evictions == 0


# ---- the policy -----------------------------------------------------------------------------------------------------


def check_writes(policy: SchedulerPolicy, step: Step) -> None:
    """Every block a step writes to is held by its sequence alone and not in the cache."""
    size = policy.allocator.block_size
    for table, start, fed in zip(step.block_tables, step.starts, step.token_ids):
        for position in range(start, start + len(fed)):
            block = table[position // size]
            assert policy.allocator._holders.get(block) == 1, f"position {position} writes shared block {block}"
            assert block not in policy.allocator._hash_of, f"position {position} writes cached block {block}"


def run_all(run: Run) -> list[Step]:
    """Every step until the policy is idle, each checked before the fake model answers it."""
    steps = []
    for _ in range(1000):
        new = run.schedule()
        for step in new:
            check_writes(run.policy, step)
        steps += new
        if not run.in_flight:
            return steps
        run.answer(run.in_flight[0])
    raise AssertionError("the policy never went idle")


def test_a_request_that_shares_a_prefix_is_prefilled_after_it():
    policy = make_policy(block_size=4)
    run = Run(policy)
    prompt = list(range(100, 110))  # two full blocks and two tokens
    first = policy.add(prompt, params(max_new_tokens=3), 0.0)
    run_all(run)
    assert run.finish(first).cached_tokens == 0 and policy.allocator.num_cached == 3  # the prompt's 2, 'zz' + 2
    second = policy.add(prompt[:8] + [7, 8, 9], params(max_new_tokens=2), 0.0)
    steps = run_all(run)
    assert (steps[0].starts[0], steps[0].token_ids[0]) == (8, (7, 8, 9))
    assert run.text(second) == "zz" and run.finish(second).cached_tokens == 8
    assert policy.stats.prefix_hits == 8 and policy.stats.prefix_queries == 10 + 11
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_generated_tokens_are_cached_too_and_the_last_known_token_is_always_computed():
    policy = make_policy(block_size=4)
    run = Run(policy)
    first = policy.add([1, 2, 3, 4, 5, 6], params(max_new_tokens=6), 0.0)
    run.model.scripts[first] = text_ids("abcdef")
    run_all(run)
    assert run.text(first) == "abcdef"
    turn = [1, 2, 3, 4, 5, 6, *text_ids("abcdef")]  # the next turn: the whole conversation so far (12 tokens)
    second = policy.add(turn, params(max_new_tokens=1), 0.0)
    steps = run_all(run)
    assert (steps[0].starts[0], steps[0].token_ids[0]) == (8, tuple(turn[8:]))  # block 3 holds the last token
    assert run.finish(second).cached_tokens == 8
    third = policy.add([1, 2, 3, 4, 5, 6, *text_ids("ab")], params(max_new_tokens=1), 0.0)  # 8 tokens: 2 blocks
    steps = run_all(run)
    assert (steps[0].starts[0], steps[0].token_ids[0]) == (4, (5, 6, *text_ids("ab")))
    assert run.finish(third).cached_tokens == 4


def test_sequences_sharing_a_prefix_hold_its_blocks_once():
    """8 blocks: a 20-token sequence takes 5; two that share 16 cached tokens fit at once (4 shared + 1 + 1)."""
    policy = make_policy(num_blocks=8, block_size=4, max_batch_size=2)
    run = Run(policy)
    prompt = list(range(100, 116))
    policy.add(prompt, params(max_new_tokens=4), 0.0)
    run_all(run)
    a = policy.add(prompt + [1, 2, 3], params(max_new_tokens=1), 0.0)
    b = policy.add(prompt + [4, 5, 6], params(max_new_tokens=1), 0.0)
    (step,) = run.schedule()
    assert step.sequence_ids == (a, b) and step.starts == (16, 16)
    assert step.block_tables[0][:4] == step.block_tables[1][:4] and step.block_tables[0][4] != step.block_tables[1][4]
    check_writes(policy, step)
    run_all(run)
    assert run.finish(a).finish_reason is FinishReason.LENGTH and run.finish(b).finish_reason is FinishReason.LENGTH
    assert policy.allocator.num_free == 8


def test_under_pressure_cached_blocks_are_evicted_and_a_later_request_computes_its_prefix():
    policy = make_policy(num_blocks=6, block_size=4)
    run = Run(policy)
    prompt = list(range(100, 108))
    policy.add(prompt, params(max_new_tokens=2), 0.0)
    run_all(run)
    assert policy.allocator.num_cached == 2
    policy.add(list(range(200, 220)), params(max_new_tokens=4), 0.0)  # 6 blocks: all of the pool
    run_all(run)
    assert policy.allocator.evictions == 2
    late = policy.add(prompt + [1], params(max_new_tokens=1), 0.0)
    steps = run_all(run)
    assert steps[0].starts == (0,) and run.finish(late).cached_tokens == 0


def test_a_hit_waits_for_room_without_evicting_itself():
    """The cached prefix is counted as free until it is held: a request needing it and more than the rest waits."""
    policy = make_policy(num_blocks=6, block_size=4, max_batch_size=2)
    run = Run(policy)
    prompt = list(range(100, 112))
    policy.add(prompt, params(max_new_tokens=1), 0.0)
    run_all(run)
    busy = policy.add([1], params(max_new_tokens=2), 0.0)  # holds 1 block: 2 empty and 3 cached ones free
    (step,) = run.schedule()
    shared = policy.add(prompt + [9] * 5, params(max_new_tokens=4), 0.0)  # 21 tokens: 3 cached + 3 new blocks > 5
    assert run.schedule() == [] and shared not in [s.id for s in policy._running]
    run.answer(step)
    run_all(run)
    assert run.finish(busy).finish_reason is FinishReason.LENGTH
    assert run.finish(shared).cached_tokens == 12 and policy.allocator.evictions == 0


def test_under_a_window_a_hit_takes_over_only_the_windows_blocks():
    """A sliding window of 6 on every layer, blocks of 4: the first request's blocks out of its window went back to
    the pool still cached; a second with the same 12 tokens and more skips all 3 full blocks but holds only the two
    its first step's window reads (positions 7-11: blocks 1 and 2), taken over from the cache; every block comes
    back, and a third request while they are held by no one hits again."""
    policy = make_policy(block_size=4, kv_window=6, prefill_chunk_tokens=4)
    run = Run(policy)
    prompt = list(range(100, 112))
    policy.add(prompt, params(max_new_tokens=1), 0.0)
    run_all(run)
    second = policy.add(prompt + [1], params(max_new_tokens=1), 0.0)
    (step,) = run.schedule()
    seq = policy._by_id[second]
    assert step.starts == (12,) and seq.dropped == 1 and len(seq.blocks) >= 2
    assert step.block_tables[0][1:3] == tuple(seq.blocks[:2])
    run.answer(step)
    run_all(run)
    assert run.finish(second).cached_tokens == 12
    third = policy.add(prompt + [2], params(max_new_tokens=1), 0.0)
    run_all(run)
    assert run.finish(third).cached_tokens == 12 and policy.stats.prefix_hits == 24
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_with_a_rope_switch_blocks_hash_apart_by_their_factors_and_the_switch_writes_blocks_of_its_own():
    """longrope's switch at 8, blocks of 4 (run_all checks that no step writes a cached or shared block): a short
    request's first block is cached with the short factors' keys; a later short request starting the same hits it,
    a long prompt (12 tokens, all rotated with the long factors) starting the same does not, and a second long one
    hits the first long one's blocks. A short request that crosses the switch is computed again into blocks of its
    own (its cached short block stays as it was: the next short request still hits it)."""
    policy = make_policy(block_size=4, rope_switch=8)
    run = Run(policy)
    prompt = list(range(100, 106))
    policy.add(prompt, params(max_new_tokens=2), 0.0)  # 8 tokens: never fed past position 7
    run_all(run)
    short = policy.add(prompt[:5], params(max_new_tokens=1), 0.0)
    run_all(run)
    assert run.finish(short).cached_tokens == 4
    long = policy.add(prompt + list(range(200, 206)), params(max_new_tokens=1), 0.0)
    run_all(run)
    assert run.finish(long).cached_tokens == 0
    again = policy.add(prompt + list(range(200, 206)) + [7], params(max_new_tokens=1), 0.0)
    run_all(run)
    assert run.finish(again).cached_tokens == 12
    crossing = policy.add(prompt, params(max_new_tokens=6, ignore_eos=True), 0.0)
    steps = run_all(run)
    assert any(s.starts == (0,) and len(s.token_ids[0]) == 9 for s in steps[1:])  # the switch's step
    assert run.finish(crossing).cached_tokens == 4
    last = policy.add(prompt[:5], params(max_new_tokens=1), 0.0)
    run_all(run)
    assert run.finish(last).cached_tokens == 4
    assert policy.allocator.num_free == policy.allocator.num_blocks


@pytest.mark.parametrize("how", ["off", "prompt_logprobs"])
def test_no_reuse_when_off_and_when_the_prompt_is_scored(how):
    options = {"off": {"prefix_caching": False}, "prompt_logprobs": {}}[how]
    policy = make_policy(block_size=4, **options)
    run = Run(policy)
    prompt = list(range(100, 112))
    policy.add(prompt, params(max_new_tokens=1), 0.0)
    run_all(run)
    extra = {"prompt_logprobs": True} if how == "prompt_logprobs" else {}
    second = policy.add(prompt + [1], params(max_new_tokens=1, **extra), 0.0)
    steps = run_all(run)
    assert steps[0].starts == (0,) and run.finish(second).cached_tokens == 0
    assert policy.prefix_caching is (how == "prompt_logprobs")
    assert policy.stats.prefix_hits == 0


def test_a_lost_pipeline_empties_the_cache_and_replays_compute_everything():
    policy = make_policy(block_size=4, max_batch_size=2)
    run = Run(policy)
    prompt = list(range(100, 108))
    policy.add(prompt, params(max_new_tokens=2), 0.0)
    run_all(run)
    seq = policy.add(prompt + [1, 2], params(max_new_tokens=4), 0.0)
    run.model.scripts[seq] = text_ids("abcd")
    (step,) = run.schedule()
    assert step.starts == (8,)
    run.answer(step)
    run.schedule()
    assert policy.requeue_all() == 1 and policy.allocator.num_cached == 0
    run.in_flight.clear()
    steps = run_all(run)
    assert steps[0].starts == (0,) and steps[0].token_ids[0] == (*prompt, 1, 2, ord("a"))
    assert run.text(seq) == "abcd" and run.finish(seq).cached_tokens == 0
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_the_driver_empties_the_cache_when_it_resumes_on_a_new_pipeline():
    pipeline = InstantPipeline()
    scheduler = Scheduler(pipeline, CharTokenizer(), batching_window_ms=0, eos_token_ids={EOS})
    events: queue.Queue = queue.Queue()
    try:
        scheduler.submit(list(range(100, 120)), params(max_new_tokens=1), events.put)
        assert events.get(timeout=10).finish_reason is FinishReason.LENGTH
        assert scheduler.allocator.num_cached == 5
        scheduler.suspend("worker0 was lost")
        scheduler.allocator.cache(scheduler.allocator.take(1)[0], block_hash(None, [1]))  # (as if cached meanwhile)
        scheduler.resume(InstantPipeline())
        assert scheduler.allocator.num_cached == 0
    finally:
        scheduler.close()


def test_the_driver_turns_caching_off_and_on_with_an_empty_cache():
    scheduler = Scheduler(InstantPipeline(), CharTokenizer(), batching_window_ms=0, eos_token_ids={EOS})
    events: queue.Queue = queue.Queue()

    def cached_tokens() -> int:
        scheduler.submit(list(range(100, 120)), params(max_new_tokens=1), events.put)
        return events.get(timeout=10).cached_tokens

    try:
        assert not scheduler.set_prefix_caching(False)
        assert [cached_tokens(), cached_tokens()] == [0, 0] and scheduler.allocator.num_cached == 0
        assert scheduler.set_prefix_caching(True)
        assert [cached_tokens(), cached_tokens()] == [0, 16] and scheduler.allocator.num_cached == 5
        assert scheduler.set_prefix_caching(True) and scheduler.allocator.num_cached == 0
    finally:
        scheduler.close()


def test_cancelled_and_failed_sequences_leave_only_computed_blocks_in_the_cache():
    policy = make_policy(block_size=4, prefill_chunk_tokens=4)
    run = Run(policy)
    seq = policy.add(list(range(100, 112)), params(max_new_tokens=8), 0.0)
    run.answer(run.schedule()[0])  # the first chunk
    (step,) = run.schedule()
    policy.cancel(seq)  # while the second is in flight: it ends when the chunk returns
    run.answer(step)
    assert run.finish(seq).finish_reason is FinishReason.CANCELLED
    assert policy.allocator.num_cached == 2  # two chunks of 4 computed: blocks 0 and 1
    failed = policy.add(list(range(200, 212)), params(max_new_tokens=1), 0.0)
    (step,) = run.schedule()
    run.answer(step, result=RuntimeError("stage failed"))
    assert run.finish(failed).finish_reason is FinishReason.ERROR and policy.allocator.num_cached == 2
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_the_metrics_count_the_tokens_looked_up_and_found():
    from chatloop.engine import EngineStats
    from chatloop.serving.metrics import ServerMetrics

    class NoHealthReport:
        def latest(self):
            return None

    stats = EngineStats(num_waiting=0, num_running=0, num_in_flight=0, last_batch_size=0, generated_tokens=0,
                        prefix_cache_queries=100, prefix_cache_hits=64, kv_blocks_cached=4)
    text = ServerMetrics(lambda: stats, NoHealthReport()).exposition().decode()
    for line in ("chatloop_prefix_cache_queries_tokens_total 100.0", "chatloop_prefix_cache_hits_tokens_total 64.0",
                 "chatloop_kv_blocks_cached 4.0"):
        assert line in text.splitlines()
    assert stats.prefix_cache_hit_rate == 0.64


# ---- in one process: the same tokens and logprobs, on or off --------------------------------------------------------

QUESTIONS = [
    ["What is the capital of France?", "And of Italy?", "Which of the two is older?"],
    ["Name a fruit.", "What colour is it?", "How is it grown?"],
    ["Write a haiku about rain.", "Now one about snow.", "Which season do you prefer?"],
]


def _chats(llm: ChatLoop) -> tuple[list, list]:
    """Three 3-turn chats, each turn of the three at once; the answers' tokens and logprobs, and the cached tokens."""
    histories = [[] for _ in QUESTIONS]
    answers, cached = [], []
    for turn in range(3):
        results: list = [None] * len(QUESTIONS)

        def one(c: int, turn: int, results: list) -> None:
            histories[c].append({"role": "user", "content": QUESTIONS[c][turn]})
            results[c] = llm.chat(list(histories[c]), max_new_tokens=12, ignore_eos=True, logprobs=1)

        threads = [threading.Thread(target=one, args=(c, turn, results)) for c in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for c, out in enumerate(results):
            histories[c].append({"role": "assistant", "content": out.text})
            answers.append((out.token_ids, [s.logprob for s in out.logprobs]))
            cached.append(out.cached_tokens)
    return answers, cached


@pytest.fixture(scope="module")
def uncached(local_smollm2_config):
    with ChatLoop.start(local_smollm2_config("cache.prefix_caching=false")) as llm:
        yield llm


def test_multi_turn_chats_give_the_same_tokens_and_logprobs_with_the_cache(llm, uncached):
    assert llm.config.cache.prefix_caching  # on by default
    want, none = _chats(uncached)
    got, cached = _chats(llm)
    assert none == [0] * 9 and uncached.stats().prefix_cache_queries == 0
    assert all(c > 0 for c in cached[3:])  # every later turn starts after the history it shares
    assert sum(cached[3:]) > 0.5 * sum(len(t) for t, _ in want)
    for k, ((want_ids, want_lp), (got_ids, got_lp)) in enumerate(zip(want, got)):
        assert got_ids == want_ids, f"answer {k}"
        assert got_lp == pytest.approx(want_lp, abs=5e-5), f"answer {k}"  # as prefill chunks do (test_scoring)
    stats = llm.stats()
    assert stats.prefix_cache_hits == sum(cached) and 0 < stats.prefix_cache_hit_rate < 1
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.kv_blocks_cached > 0
    text = "The history of the city goes back to Roman times, when a small camp stood on the river bank. " * 2
    assert llm.generate(text + "Later", max_new_tokens=1).cached_tokens == 0  # caches the text's blocks
    scored, reference = llm.score(text + "Today"), uncached.score(text + "Today")
    assert scored.logprobs == pytest.approx(reference.logprobs, abs=5e-5)  # all computed: none missing


# ---- every family: the policy driving a tiny model's stages in this process --------------------------------------

FAMILIES = ["llama", "qwen2", "gpt2", "qwen3", "granite", "olmo2", "gemma2", "gemma3_text", "qwen3_moe"]


def _greedy(parts, prompts: list[list[int]], prefix_caching: bool) -> tuple[list[list[int]], int]:
    """Each prompt's 6 greedy tokens, one request after another through the split model's stages (so that later
    ones find earlier ones' blocks), and the tokens found in the prefix cache."""
    from chatloop.engine.pipeline import LocalPipeline, MicroBatch
    from chatloop.engine.requests import SamplingParams
    from chatloop.models import StepBatch
    from chatloop.models.batch import padded
    from chatloop.partition import Manifest, load_stage
    from chatloop.stage import StageRunner

    manifest = Manifest.load(parts)
    runners = [StageRunner(load_stage(parts, i, manifest=manifest), 64, 4) for i in range(manifest.num_partitions)]
    pipeline = LocalPipeline(runners)
    policy = SchedulerPolicy(BlockAllocator(64, 4), CharTokenizer(), batching_window_s=0.0, max_batch_size=2,
                             prefix_caching=prefix_caching)
    tokens: list[list[int]] = []
    try:
        for prompt in prompts:
            seq = policy.add(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True), 0.0)
            out: list[int] = []
            while policy.stats.num_running or policy.stats.num_waiting:
                steps, outputs = policy.schedule(0.0)
                for step in steps:
                    check_writes(policy, step)
                    batch = StepBatch.build(list(step.starts), [len(t) for t in step.token_ids],
                                            list(step.block_tables), 4)
                    result = pipeline.submit(MicroBatch(step.id, padded(step.token_ids), batch, list(step.sampling)))
                    outputs += policy.complete(step.id, result.result(timeout=60))
                for sequence_id, event in outputs:
                    assert event.error is None and sequence_id == seq, event.error
                    out += event.token_ids
            tokens.append(out)
    finally:
        pipeline.close()
    assert policy.allocator.num_free == 64
    return tokens, policy.stats.prefix_hits


@pytest.fixture(scope="module")
def two_stages(tiny_checkpoint, tmp_path_factory):
    from chatloop.partition.splitter import split_model

    def split(family: str):
        out = tmp_path_factory.mktemp(f"{family}-2")
        split_model(tiny_checkpoint(family).path, out, 2, progress=False)
        return out

    return split


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_the_same_greedy_tokens_from_cached_blocks(family, two_stages):
    import random

    rng = random.Random(7)
    base = [rng.randrange(2, 128) for _ in range(14)]
    prompts = [base + [rng.randrange(2, 128) for _ in range(k)] for k in (3, 9, 2)] + [base[:9]]
    parts = two_stages(family)
    without, none = _greedy(parts, prompts, prefix_caching=False)
    with_cache, hits = _greedy(parts, prompts, prefix_caching=True)
    assert none == 0 and hits >= 12 * 2 + 8  # the shared 12 tokens (3 blocks) for the next two, 2 blocks for the last
    assert with_cache == without


def test_phi3s_next_turn_past_its_rope_switch_reuses_the_long_factors_blocks_and_keeps_its_tokens(two_stages):
    """Phi-3 (longrope switch at 16, window 24, as the engine passes them) over two stages: a first turn of 10 tokens
    generates 12, crossing the switch (computed again with the long factors); the next turn (its prompt, answer
    and 3 more) starts after 20 cached tokens of the long factors' keys, and both turns' greedy tokens equal those
    without the prefix cache."""
    from dataclasses import replace

    from test_speculation import GREEDY, local_pipeline, prompts
    from test_speculation import run as run_scheduler

    from chatloop.models import ModelArgs
    from chatloop.partition import Manifest

    parts = two_stages("phi3")
    args = ModelArgs.from_hf_config(Manifest.load(parts).model_config)
    first, turn = prompts(1)[0][:10], [replace(GREEDY, max_new_tokens=12)]

    def chat(prefix_caching: bool) -> tuple[list[int], list[int], int]:
        pipeline = local_pipeline(parts)
        scheduler = Scheduler(pipeline, CharTokenizer(), batching_window_ms=0, prefix_caching=prefix_caching,
                              rope_switch=args.rope_switch, kv_window=args.kv_window)
        try:
            [(answer, _)] = run_scheduler(scheduler, [first], turn)
            [(tokens, last)] = run_scheduler(scheduler, [first + answer + [5, 6, 7]], turn)
            assert scheduler.allocator.num_free == scheduler.allocator.num_blocks
            return answer, tokens, last.cached_tokens
        finally:
            scheduler.close()
            pipeline.close()

    assert args.rope_switch == 16
    cached, plain = chat(True), chat(False)
    assert cached[:2] == plain[:2] and cached[2] == 20 and plain[2] == 0
