"""The scheduling policy on its own: a fake model, a fake clock, no threads, no sleeps, no torch; then its driver."""

from __future__ import annotations

import ast
import queue
from concurrent.futures import Future
from pathlib import Path

import pytest

import chatloop.engine
from chatloop.engine import (
    BlockAllocator,
    ContextLengthError,
    EmptyPromptError,
    FinishReason,
    Pipeline,
    QueueFullError,
    SamplingParams,
    Scheduler,
    SchedulerPolicy,
    Step,
)

EOS = 3


class CharTokenizer:
    """Token id i is the character chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def text_ids(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeModel:
    """The pipeline's answers, as a model's depend only on the tokens before: after a sequence's prompt and k
    generated tokens, its next token is ``scripts[s][k]`` (then 'z' forever)."""

    def __init__(self, scripts: dict[int, list[int]] | None = None) -> None:
        self.scripts = scripts or {}
        self.produced: dict[int, int] = {}  # how often each sequence was sampled

    def answer(self, step: Step, prompt_lengths: dict[int, int]) -> list[int]:
        tokens = []
        for seq, start, fed in zip(step.sequence_ids, step.starts, step.token_ids):
            self.produced[seq] = self.produced.get(seq, 0) + 1
            k = start + len(fed) - prompt_lengths[seq]  # generated tokens before the one sampled now
            script = self.scripts.get(seq, [])
            tokens.append(script[k] if 0 <= k < len(script) else ord("z"))
        return tokens


def make_policy(num_blocks: int = 64, block_size: int = 4, **options) -> SchedulerPolicy:
    options.setdefault("batching_window_s", 0.0)
    return SchedulerPolicy(BlockAllocator(num_blocks, block_size), CharTokenizer(), eos_token_ids={EOS}, **options)


def params(max_new_tokens: int = 4, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, **kw)


class Run:
    """Drives a policy the way the scheduler thread does, one step at a time, collecting every event."""

    def __init__(self, policy: SchedulerPolicy, model: FakeModel | None = None) -> None:
        self.policy, self.model = policy, model or FakeModel()
        self.now = 0.0
        self.events: dict[int, list] = {}
        self.in_flight: list[Step] = []

    def collect(self, outputs) -> None:
        for seq, event in outputs:
            self.events.setdefault(seq, []).append(event)

    def schedule(self) -> list[Step]:
        steps, outputs = self.policy.schedule(self.now)
        self.collect(outputs)
        self.in_flight += steps
        return steps

    def answer(self, step: Step, result=None) -> None:
        self.in_flight.remove(step)
        if result is None:
            lengths = {seq: len(self.policy._by_id[seq].prompt_ids) for seq in step.sequence_ids}
            result = self.model.answer(step, lengths)
        self.collect(self.policy.complete(step.id, result))

    def until_idle(self, max_rounds: int = 1000) -> None:
        for _ in range(max_rounds):
            self.schedule()
            if not self.in_flight:
                return
            self.answer(self.in_flight[0])
        raise AssertionError("the policy never went idle")

    def text(self, seq: int) -> str:
        return "".join(e.text for e in self.events[seq])

    def finish(self, seq: int):
        last = self.events[seq][-1]
        assert last.finish_reason is not None, f"sequence {seq} has not finished"
        assert all(e.finish_reason is None for e in self.events[seq][:-1])
        return last


def test_a_request_waits_for_company_for_the_batching_window():
    policy = make_policy(batching_window_s=0.005, max_batch_size=4)
    run = Run(policy)
    first = policy.add([1, 2], params(), now=0.0)
    assert run.schedule() == []
    assert policy.next_wakeup(0.0) == pytest.approx(0.005)
    run.now = 0.004
    assert run.schedule() == []
    second = policy.add([4, 5, 6], params(), now=0.004)
    run.now = 0.005  # the first request's window is over: both go in one prefill
    (step,) = run.schedule()
    assert step.sequence_ids == (first, second)
    assert step.token_ids == ((1, 2), (4, 5, 6)) and step.starts == (0, 0)


def test_a_full_batch_does_not_wait_for_the_window():
    policy = make_policy(batching_window_s=10.0, max_batch_size=2)
    run = Run(policy)
    a, b = policy.add([1], params(), 0.0), policy.add([2], params(), 0.0)
    (step,) = run.schedule()
    assert step.sequence_ids == (a, b)


def test_admission_waits_for_blocks_first_come_first_served():
    policy = make_policy(num_blocks=4, block_size=4)  # 16 tokens in all
    run = Run(policy)
    big = policy.add([1] * 8, params(max_new_tokens=4), 0.0)  # 12 tokens: 3 blocks
    middle = policy.add([1] * 4, params(max_new_tokens=4), 0.0)  # 2 blocks: only 1 is left
    small = policy.add([1], params(max_new_tokens=3), 0.0)  # 1 block: free, but must not overtake
    (step,) = run.schedule()
    assert step.sequence_ids == (big,)
    assert policy.allocator.num_free == 1 and policy.stats.num_waiting == 2
    run.answer(step)
    assert policy.next_wakeup(0.0) == 0  # the decode step, not the blocked queue
    run.until_idle()
    assert run.finish(big).finish_reason is FinishReason.LENGTH
    assert (run.finish(middle).finish_reason is FinishReason.LENGTH
            and run.finish(small).finish_reason is FinishReason.LENGTH)
    assert policy.allocator.num_free == 4


def test_a_blocked_queue_does_not_wake_the_scheduler():
    policy = make_policy(num_blocks=2, block_size=4)
    run = Run(policy)
    policy.add([1] * 4, params(max_new_tokens=4), 0.0)  # both blocks
    policy.add([1], params(max_new_tokens=1), 0.0)
    (_step,) = run.schedule()
    assert policy.next_wakeup(0.0) is None  # in flight, and no blocks for the waiting one: nothing to do


def test_continuous_batching_lets_a_waiting_request_join_when_one_finishes():
    policy = make_policy(max_batch_size=2, max_in_flight=1)
    run = Run(policy)
    short = policy.add([1], params(max_new_tokens=1), 0.0)
    long = policy.add([2], params(max_new_tokens=3), 0.0)
    late = policy.add([3, 3], params(max_new_tokens=2), 0.0)
    (prefill,) = run.schedule()
    assert prefill.sequence_ids == (short, long)  # the batch is full: late waits
    run.answer(prefill)
    assert run.finish(short).finish_reason is FinishReason.LENGTH
    (join,) = run.schedule()
    assert join.sequence_ids == (late,) and join.token_ids == ((3, 3),)  # a prompt goes before the decodes
    run.answer(join)
    (decode,) = run.schedule()
    assert decode.sequence_ids == (long, late) and decode.token_ids == ((ord("z"),), (ord("z"),))
    assert decode.starts == (1, 2)
    run.until_idle()
    assert [len(e.token_ids) for e in run.events[long]] == [1, 1, 1]


def test_prefills_and_decodes_go_in_separate_micro_batches_up_to_max_in_flight():
    policy = make_policy(max_batch_size=8, max_in_flight=2)
    run = Run(policy)
    first = [policy.add([1, 2, 3], params(max_new_tokens=5), 0.0) for _ in range(4)]
    steps = run.schedule()
    assert [s.sequence_ids for s in steps] == [tuple(first[:2]), tuple(first[2:])]  # split over 2 in flight
    assert run.schedule() == []  # two in flight already
    run.answer(steps[0])
    newcomer = policy.add([9, 9], params(), 0.0)
    (decode,) = run.schedule()  # prompts and decodes take turns: the decodes go first after a prefill
    assert decode.sequence_ids == tuple(first[:2]) and all(len(t) == 1 for t in decode.token_ids)
    run.answer(steps[1])
    (prefill,) = run.schedule()
    assert prefill.sequence_ids == (newcomer,) and prefill.token_ids == ((9, 9),)  # alone, not padded into a decode


def test_max_tokens_per_micro_batch_splits_a_prefill():
    policy = make_policy(max_batch_size=4, max_in_flight=1, max_tokens_per_micro_batch=10)
    run = Run(policy)
    a = policy.add([1] * 4, params(), 0.0)
    b = policy.add([1] * 4, params(), 0.0)
    c = policy.add([1] * 4, params(), 0.0)
    (step,) = run.schedule()
    assert step.sequence_ids == (a, b)  # 3 x 4 padded tokens would pass 10
    run.answer(step)
    assert run.schedule()[0].sequence_ids == (a, b)  # their decode, then the rest of the prompts
    run.answer(run.in_flight[0])
    assert run.schedule()[0].sequence_ids == (c,)


def test_a_sequence_never_has_two_steps_in_flight():
    policy = make_policy(max_batch_size=1, max_in_flight=4)
    run = Run(policy)
    policy.add([1], params(max_new_tokens=3), 0.0)
    assert len(run.schedule()) == 1
    assert run.schedule() == []  # its step is out: nothing else can go
    assert policy.next_wakeup(0.0) is None


def test_cancelled_while_in_flight_ends_when_its_step_returns_and_frees_its_blocks():
    policy = make_policy()
    run = Run(policy)
    seq = policy.add([1, 2], params(max_new_tokens=10), 0.0)
    (step,) = run.schedule()
    policy.cancel(seq)
    assert policy.next_wakeup(0.0) is None  # no busy wait while its step is out
    assert run.schedule() == [] and seq not in run.events
    run.answer(step)
    assert run.finish(seq).finish_reason is FinishReason.CANCELLED
    assert run.finish(seq).token_ids == ()  # the token of the abandoned step is not delivered
    assert policy.allocator.num_free == policy.allocator.num_blocks
    assert policy.stats.finished == {"cancelled": 1}


def test_cancelled_while_waiting_or_between_steps_ends_at_the_next_schedule():
    policy = make_policy(max_batch_size=1)
    run = Run(policy)
    running = policy.add([1], params(max_new_tokens=10), 0.0)
    waiting = policy.add([2], params(), 0.0)
    (step,) = run.schedule()
    run.answer(step)
    policy.cancel(waiting)
    policy.cancel(running)
    assert policy.next_wakeup(0.0) == 0
    assert run.schedule() == []
    assert run.finish(waiting).finish_reason is FinishReason.CANCELLED
    assert run.finish(running).finish_reason is FinishReason.CANCELLED
    assert policy.allocator.num_free == policy.allocator.num_blocks and policy.stats.num_running == 0


def test_stop_strings_end_the_text_before_them():
    policy = make_policy()
    run = Run(policy, FakeModel({0: text_ids("abEcEND tail")}))
    seq = policy.add([1], params(max_new_tokens=20, stop=("END",)), 0.0)
    run.until_idle()
    assert run.finish(seq).finish_reason is FinishReason.STOP
    assert run.text(seq) == "abEc"
    assert all("N" not in e.text for e in run.events[seq])  # "EN" was held back: it could become "END"


def test_max_new_tokens_ends_with_length_and_keeps_the_last_token():
    policy = make_policy()
    run = Run(policy, FakeModel({0: text_ids("hello")}))
    seq = policy.add([1], params(max_new_tokens=3), 0.0)
    run.until_idle()
    last = run.finish(seq)
    assert last.finish_reason is FinishReason.LENGTH and last.token_ids == (ord("l"),)
    assert run.text(seq) == "hel" and policy.stats.generated_tokens == 3


def test_end_of_sequence_stops_unless_ignored():
    policy = make_policy()
    run = Run(policy, FakeModel({0: [ord("a"), EOS, ord("b")], 1: [ord("a"), EOS, ord("b")]}))
    stops = policy.add([1], params(max_new_tokens=5), 0.0)
    goes_on = policy.add([1], params(max_new_tokens=3, ignore_eos=True), 0.0)
    run.until_idle()
    assert run.finish(stops).finish_reason is FinishReason.STOP and run.text(stops) == "a"
    assert run.finish(goes_on).finish_reason is FinishReason.LENGTH
    assert [t for e in run.events[goes_on] for t in e.token_ids] == [ord("a"), EOS, ord("b")]


def test_a_failed_step_ends_its_sequences_with_the_error_and_frees_their_blocks():
    policy = make_policy(max_batch_size=4, max_in_flight=2)
    run = Run(policy)
    a, b, c = (policy.add([1], params(max_new_tokens=5), 0.0) for _ in range(3))
    first, _second = run.schedule()
    failure = RuntimeError("worker2 failed")
    run.answer(first, result=failure)
    for seq in first.sequence_ids:
        assert run.finish(seq).finish_reason is FinishReason.ERROR and run.finish(seq).error is failure
    run.until_idle()
    assert run.finish(c).finish_reason is FinishReason.LENGTH
    assert policy.allocator.num_free == policy.allocator.num_blocks
    assert policy.stats.finished == {"error": 2, "length": 1} and {a, b} == set(first.sequence_ids)


def test_each_step_carries_the_blocks_its_positions_need_and_seeded_sampling_inputs():
    policy = make_policy(block_size=4)
    run = Run(policy)
    seq = policy.add([1] * 5, params(max_new_tokens=8, seed=42, temperature=0.5, repetition_penalty=1.2), 0.0)
    (prefill,) = run.schedule()
    assert len(prefill.block_tables[0]) == 2  # 5 tokens in blocks of 4
    sampler = prefill.sampling[0]
    assert (sampler.seed, sampler.step, sampler.temperature) == (42, 0, 0.5) and sampler.history == (1,) * 5
    run.answer(prefill)
    (decode,) = run.schedule()
    assert decode.starts == (5,) and decode.sampling[0].step == 1 and len(decode.block_tables[0]) == 2
    assert decode.sampling[0].history == (1,) * 5 + (ord("z"),)
    assert seq in run.events


def test_requests_that_cannot_run_raise_typed_errors():
    policy = make_policy(num_blocks=4, block_size=4, max_queue_size=1, max_context=12)
    with pytest.raises(EmptyPromptError, match="prompt is empty"):
        policy.add([], params(), 0.0)
    with pytest.raises(ContextLengthError, match="context of 12 tokens") as e:
        policy.add([1] * 10, params(max_new_tokens=4), 0.0)
    assert e.value.param == "max_tokens"
    big = make_policy(num_blocks=2, block_size=4)
    with pytest.raises(ContextLengthError, match="exceeds the KV cache's 8 tokens: lower max_new_tokens or raise"):
        big.add([1] * 6, params(max_new_tokens=4), 0.0)
    policy.add([1], params(), 0.0)
    with pytest.raises(QueueFullError, match=r"queue is full \(1 waiting\)"):
        policy.add([1], params(), 0.0)
    assert policy.context_length == 12 and big.context_length == 8


def test_close_cancels_everything():
    policy = make_policy(max_batch_size=1)
    run = Run(policy)
    running = policy.add([1], params(), 0.0)
    waiting = policy.add([2], params(), 0.0)
    run.schedule()
    run.collect(policy.close())
    assert run.finish(running).finish_reason is FinishReason.CANCELLED
    assert run.finish(waiting).finish_reason is FinishReason.CANCELLED
    assert policy.stats.num_running == policy.stats.num_waiting == 0


def test_finish_reasons_read_as_their_names():
    assert str(FinishReason.LENGTH) == "length" and FinishReason.STOP == "stop"


def test_the_policy_and_what_it_imports_use_no_torch_no_threads_and_no_clock():
    folder = Path(chatloop.engine.__file__).parent
    for module in ("policy", "blocks", "detokenizer", "errors", "requests"):
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {alias.name.split(".")[0]
                    for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        assert not imported & {"torch", "time", "threading"}, f"{module}.py imports {sorted(imported)}"


class InstantPipeline(Pipeline):
    """A pipeline whose steps answer at once, on the caller's thread: 'z' for every sequence."""

    def __init__(self) -> None:
        super().__init__(["fake"], num_blocks=64, block_size=4)

    def _submit(self, micro_batch) -> Future:
        future: Future = Future()
        future.set_result([ord("z")] * micro_batch.token_ids.shape[0])
        return future

    def describe(self, timeout):
        return []

    def take_timings(self):
        return {}

    def inject_failure(self, stage, message="injected", stall_s=0.0):
        raise NotImplementedError


def test_the_driver_delivers_every_event_and_observers_see_every_step():
    pipeline = InstantPipeline()
    records = []
    pipeline.add_observer(records.append)
    scheduler = Scheduler(pipeline, CharTokenizer(), batching_window_ms=0, eos_token_ids={EOS})
    events: queue.Queue = queue.Queue()
    try:
        scheduler.submit([1, 2], params(max_new_tokens=3), events.put)
        got = [events.get(timeout=10) for _ in range(3)]
    finally:
        scheduler.close()
    assert "".join(e.text for e in got) == "zzz" and got[-1].finish_reason is FinishReason.LENGTH
    assert [(r.num_sequences, r.num_tokens, r.failed) for r in records] == [(1, 2, False), (1, 1, False), (1, 1, False)]


def test_a_long_prompt_is_prefilled_in_chunks_and_only_its_last_chunk_samples():
    policy = make_policy(prefill_chunk_tokens=4)
    run = Run(policy)
    seq = policy.add(list(range(100, 110)), params(max_new_tokens=2), 0.0)
    chunks = []
    for _ in range(3):
        (step,) = run.schedule()
        chunks.append((step.starts[0], step.token_ids[0]))
        run.answer(step)
        assert seq not in run.events or chunks[-1][0] == 8  # no token before the last chunk
    assert chunks == [(0, (100, 101, 102, 103)), (4, (104, 105, 106, 107)), (8, (108, 109))]
    assert [e.token_ids for e in run.events[seq]] == [(ord("z"),)]
    assert run.model.produced[seq] == 3  # the sampler ran after each chunk; two of those tokens were dropped
    run.until_idle()
    assert run.finish(seq).finish_reason is FinishReason.LENGTH and run.text(seq) == "zz"


def test_decodes_take_turns_with_a_long_prefill():
    policy = make_policy(prefill_chunk_tokens=2, max_batch_size=4, max_in_flight=1)
    run = Run(policy)
    short = policy.add([1], params(max_new_tokens=6), 0.0)
    run.answer(run.schedule()[0])  # its prompt: it decodes from now on
    long = policy.add(list(range(40, 50)), params(max_new_tokens=1), 0.0)
    kinds = []
    while long not in run.events:
        (step,) = run.schedule()
        kinds.append("prefill" if step.sequence_ids == (long,) else "decode")
        run.answer(step)
    assert kinds == ["prefill", "decode", "prefill", "decode", "prefill", "decode", "prefill", "decode", "prefill"]
    assert len(run.events[short]) == 1 + 4  # its first token, then a decode between every two chunks


def test_one_sequence_that_cannot_be_sampled_ends_alone():
    policy = make_policy(max_batch_size=3)
    run = Run(policy)
    a, b, c = (policy.add([1], params(max_new_tokens=2), 0.0) for _ in range(3))
    (step,) = run.schedule()
    run.answer(step, result=[ord("x"), "sampling failed: ValueError: the model's logits hold NaN", ord("y")])
    failed = run.finish(b)
    assert failed.finish_reason is FinishReason.ERROR and "logits hold NaN" in str(failed.error)
    run.until_idle()
    assert run.text(a) == "xz" and run.text(c) == "yz"
    assert run.finish(a).finish_reason is FinishReason.LENGTH and run.finish(c).finish_reason is FinishReason.LENGTH


def test_a_lost_pipeline_requeues_running_sequences_to_be_prefilled_again_with_what_they_have():
    policy = make_policy(max_batch_size=2, prefill_chunk_tokens=4)
    run = Run(policy, FakeModel({0: text_ids("abcdef"), 1: text_ids("uvwxyz")}))
    a = policy.add([1, 2, 3], params(max_new_tokens=6), 0.0)
    b = policy.add([4, 5], params(max_new_tokens=6), 0.0)
    late = policy.add([9], params(max_new_tokens=6), 0.0)  # waits: the batch is full
    for _ in range(3):  # the prompts, then two decodes
        run.answer(run.schedule()[0])
    assert run.text(a) == "abc" and run.text(b) == "uvw"
    (lost_step,) = run.schedule()
    assert policy.requeue_all() == 2 and policy.stats.replays == 2
    assert policy.allocator.num_free == policy.allocator.num_blocks  # fresh blocks at re-admission
    assert policy.complete(lost_step.id, [ord("!"), ord("!")]) == []  # the lost step's answer is ignored
    run.in_flight.clear()
    (replay,) = run.schedule()
    assert replay.sequence_ids == (a, b)  # back first, in their order, before the one that waited
    assert replay.token_ids == ((1, 2, 3, ord("a")), (4, 5, ord("u"), ord("v")))  # chunks of 4 of what is known
    assert replay.sampling[0].step == 3  # the seeded generator goes on from the next token
    run.until_idle()
    assert run.text(a) == "abcdef" and run.text(b) == "uvwxyz"  # nothing lost, nothing repeated
    assert [e.finish_reason for e in run.events[late]][-1] is FinishReason.LENGTH


def test_a_request_past_its_deadline_ends_with_a_clear_error():
    policy = make_policy(max_batch_size=1)
    run = Run(policy)
    running = policy.add([1], params(max_new_tokens=50, timeout_s=2.0), 0.0)
    waiting = policy.add([2], params(max_new_tokens=5, timeout_s=1.0), 0.0)
    (step,) = run.schedule()
    assert policy.next_wakeup(0.0) == pytest.approx(1.0)  # the earliest deadline wakes the driver
    policy.paused_reason = "worker2 was lost"
    run.now = 1.5
    run.schedule()
    error = run.finish(waiting).error
    assert "did not finish within its timeout of 1 s (the cluster was recovering: worker2 was lost)" in str(error)
    run.now = 2.5
    run.schedule()  # still in flight: it ends when its step returns
    run.answer(step)
    assert run.finish(running).finish_reason is FinishReason.ERROR
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_fail_all_ends_everything_with_the_error():
    policy = make_policy(max_batch_size=1)
    run = Run(policy)
    a, b = policy.add([1], params(), 0.0), policy.add([2], params(), 0.0)
    run.schedule()
    down = RuntimeError("worker2 is down")
    run.collect(policy.fail_all(down))
    assert run.finish(a).error is down and run.finish(b).error is down
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_the_driver_suspends_on_a_lost_pipeline_and_resumes_on_a_new_one():
    first, second = InstantPipeline(), InstantPipeline()
    scheduler = Scheduler(first, CharTokenizer(), batching_window_ms=0, eos_token_ids={EOS})
    events: queue.Queue = queue.Queue()
    try:
        assert scheduler.suspend("worker0 was lost") == 0
        scheduler.submit([1, 2], params(max_new_tokens=3), events.put)
        with pytest.raises(queue.Empty):
            events.get(timeout=0.3)  # nothing runs while suspended
        scheduler.resume(second)
        got = [events.get(timeout=10) for _ in range(3)]
    finally:
        scheduler.close()
    assert "".join(e.text for e in got) == "zzz" and scheduler.pipeline is second


def test_a_rebuilt_pipeline_with_a_smaller_pool_refuses_what_it_cannot_hold_and_serves_the_rest():
    """A replacement worker with less memory rebuilds the pipeline with fewer KV blocks: a waiting request that no
    longer fits ends with a ContextLengthError saying so, instead of waiting at the queue's head for ever with the
    requests behind it."""
    from chatloop.engine.errors import ContextLengthError

    smaller = InstantPipeline()
    smaller.num_blocks = 8  # 32 tokens of 4
    scheduler = Scheduler(InstantPipeline(), CharTokenizer(), batching_window_ms=0, eos_token_ids={EOS})
    long_events: queue.Queue = queue.Queue()
    short_events: queue.Queue = queue.Queue()
    try:
        scheduler.suspend("worker1 was lost")
        scheduler.submit(list(range(1, 41)), params(max_new_tokens=3), long_events.put)  # 43 tokens: 11 blocks
        scheduler.submit([1, 2], params(max_new_tokens=3), short_events.put)
        scheduler.resume(smaller)
        ended = long_events.get(timeout=10)
        got = [short_events.get(timeout=10) for _ in range(3)]
    finally:
        scheduler.close()
    assert ended.finish_reason is FinishReason.ERROR and isinstance(ended.error, ContextLengthError)
    assert "needs 11 blocks of the KV cache, and the rebuilt pipeline's holds 8" in str(ended.error)
    assert "".join(e.text for e in got) == "zzz" and got[-1].finish_reason is not None
    assert scheduler.allocator.num_blocks == 8 and scheduler.allocator.num_free == 8


def test_a_lost_step_requeues_its_sequences_and_nothing_is_launched_for_a_moment():
    policy = make_policy(max_batch_size=2)
    run = Run(policy, FakeModel({0: text_ids("abc"), 1: text_ids("xyz")}))
    a = policy.add([1], params(max_new_tokens=3), 0.0)
    b = policy.add([2], params(max_new_tokens=3), 0.0)
    run.answer(run.schedule()[0])
    (lost,) = run.schedule()
    run.in_flight.clear()
    assert policy.requeue_step(lost.id, retry_at=1.0) == 2
    assert policy.schedule(0.5)[0] == [] and policy.next_wakeup(0.5) == pytest.approx(0.5)
    run.now = 1.0
    run.until_idle()
    assert run.text(a) == "abc" and run.text(b) == "xyz" and policy.stats.replays == 2


def every_step(run: Run) -> list[Step]:
    """Every step the policy launches until it is idle, each answered by the fake model in turn."""
    steps = []
    for _ in range(1000):
        steps += run.schedule()
        if not run.in_flight:
            return steps
        run.answer(run.in_flight[0])
    raise AssertionError("the policy never went idle")


def test_the_step_that_crosses_a_longrope_switch_computes_the_sequence_again_from_its_first_token():
    """Phi-3's longrope: transformers' generate drops its cache at the step that feeds position
    original_max_position_embeddings (its positions were rotated with the short factors); so does the policy, in
    one step however the prompt was chunked, and decodes go on after it."""
    policy = make_policy(prefill_chunk_tokens=3, rope_switch=6)
    run = Run(policy, FakeModel({0: text_ids("abcdef")}))
    seq = policy.add([1, 2, 3, 4], params(max_new_tokens=6), 0.0)
    steps = [(step.starts[0], step.token_ids[0], step.sampling[0].step) for step in every_step(run)]
    assert steps == [(0, (1, 2, 3), 0), (3, (4,), 0), (4, (ord("a"),), 1), (5, (ord("b"),), 2),
                     (0, (1, 2, 3, 4, ord("a"), ord("b"), ord("c")), 3), (7, (ord("d"),), 4), (8, (ord("e"),), 5)]
    assert run.text(seq) == "abcdef" and policy.stats.replays == 0
    assert policy.allocator.num_free == policy.allocator.num_blocks


def test_a_prompt_longer_than_the_longrope_switch_is_prefilled_in_one_step_however_it_is_chunked():
    """transformers computes such a prompt in one call, every position with the long factors: chunks before the
    switch would have rotated theirs with the short ones. A shorter prompt is still chunked; under a window the
    admission counts the whole step's blocks."""
    policy = make_policy(prefill_chunk_tokens=3, rope_switch=6)
    run = Run(policy)
    long, short = policy.add([1, 2, 3, 4, 5, 6, 7, 8], params(max_new_tokens=2), 0.0), policy.add([1, 2, 3, 4],
                                                                                                 params(2), 0.0)
    steps = [(i, start, len(tokens)) for step in every_step(run)
             for i, start, tokens in zip(step.sequence_ids, step.starts, step.token_ids)]
    assert [s for s in steps if s[0] == long] == [(long, 0, 8), (long, 8, 1)]
    assert [s for s in steps if s[0] == short][:2] == [(short, 0, 3), (short, 3, 1)]
    assert run.text(long) == "zz" and policy.allocator.num_free == policy.allocator.num_blocks
    windowed = make_policy(num_blocks=64, block_size=2, kv_window=3, prefill_chunk_tokens=2, rope_switch=6)
    assert windowed._most_blocks(9) == 5 and windowed._most_blocks(6) == (3 + 2 - 2) // 2 + 2


def test_a_longrope_switch_past_the_window_takes_fresh_blocks_for_the_positions_given_up():
    """Under a window shorter than the switch, the first blocks were given up: the step that computes the sequence
    again names a block for each of its positions, none shared."""
    policy = make_policy(num_blocks=16, block_size=2, kv_window=3, rope_switch=8)
    run = Run(policy)
    seq = policy.add([1, 2], params(max_new_tokens=10), 0.0)
    (whole,) = [step for step in every_step(run) if step.starts[0] == 0 and len(step.token_ids[0]) == 9]
    assert len(set(whole.block_tables[0])) == len(whole.block_tables[0]) == 5  # positions 0..8, 2 a block
    assert run.text(seq) == "z" * 10 and policy.stats.replays == 0
    assert policy.allocator.num_free == policy.allocator.num_blocks
