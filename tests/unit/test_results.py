"""The coordinator's inbox for the last stage's answers: each micro-batch resolves once, first answer wins."""

from __future__ import annotations

import time

import pytest
import torch

from chatloop.engine import FaultKind, MicroBatch, StageError, StageLostError, stage_fault
from chatloop.models import StepBatch
from chatloop.runtime.cluster import RpcPipeline
from chatloop.runtime.results import Results


class SentMessages:
    """A link that keeps what is sent on it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple]] = []

    def send(self, method: str, args: tuple) -> None:
        self.sent.append((method, args))

    def close(self) -> None:
        pass


def _step(mb_id: int) -> MicroBatch:
    batch = StepBatch(torch.tensor([[3]]), torch.tensor([[True]]), torch.zeros(1, 4, dtype=torch.int32), 16)
    return MicroBatch(mb_id, torch.tensor([[7]]), batch, [])


@pytest.fixture
def results() -> Results:
    return Results()


def _pipeline(results: Results, names=("worker0", "worker1"), **options) -> RpcPipeline:
    options = {"num_blocks": 8, "block_size": 16, "timeout": 0.5, "progress_deadline_s": 10, **options}
    made = RpcPipeline(list(names), link=SentMessages(), results=results, **options)
    results.on_failure = made.failed  # as the cluster sets it for the current generation
    return made


@pytest.fixture
def pipeline(monkeypatch, results):
    """A coordinator's pipeline of two stages whose lost steps are located by a stand-in (no RPC)."""
    made = _pipeline(results)
    made.located = []

    def locate_and_fail(mb_id, error):
        made.located.append((mb_id, str(error)))
        results.fail(mb_id, StageLostError(f"worker1 does not answer ({error})"))

    monkeypatch.setattr(made, "_fail_lost", locate_and_fail)
    yield made
    made.close()


def test_delivered_tokens_resolve_the_micro_batch_and_a_later_failure_is_ignored(results):
    future = results.expect(1001)
    results.deliver(1001, [5, 7])
    results.fail(1001, RuntimeError("the chain finished late"))  # arrives after the tokens: no effect
    assert future.result(timeout=1) == [5, 7]
    results.deliver(1001, [9])  # a duplicate or unknown micro-batch is dropped
    results.deliver(424242, [1])


def test_a_failure_first_resolves_with_the_error_and_late_tokens_are_dropped(results):
    future = results.expect(1002)
    results.fail(1002, RuntimeError("worker2 failed"))
    results.deliver(1002, [1])
    with pytest.raises(RuntimeError, match="worker2 failed"):
        future.result(timeout=1)


def test_a_micro_batch_id_is_in_flight_once(results):
    results.expect(1003)
    with pytest.raises(AssertionError, match="already in flight"):
        results.expect(1003)
    results.deliver(1003, [])


def test_a_step_goes_out_on_the_link_and_a_stage_report_fails_it_with_the_stage_s_own_error(pipeline, results):
    future = pipeline._submit(_step(2001))
    assert pipeline.link.sent[0][0] == "forward" and pipeline.link.sent[0][1][0] == 2001
    results.report_failure(2001, StageError("worker1 (layers 15-29) failed: RuntimeError: bad shape"))
    with pytest.raises(StageError, match="^worker1 \\(layers 15-29\\) failed"):
        future.result(timeout=1)
    assert pipeline.located == [] and pipeline._sent == {}


def test_a_stage_s_own_failure_fails_its_step_whatever_its_text_says(pipeline, results):
    """The fault's type decides, not its words: a stage's failure that reads like a transport error is no loss."""
    future = pipeline._submit(_step(2006))
    results.report_failure(2006, StageError("worker1: connection reset while it timed out", stage=1))
    with pytest.raises(StageError) as e:
        future.result(timeout=1)
    assert not isinstance(e.value, StageLostError) and e.value.kind is FaultKind.FAILED and e.value.stage == 1
    assert pipeline.located == []


def test_a_closed_link_has_every_step_in_flight_located(pipeline, results):
    first, second = pipeline._submit(_step(2002)), pipeline._submit(_step(2003))
    lost = StageLostError("worker1 is unreachable from worker0: the connection closed (EOF)", cause="EOF")
    assert lost.kind is FaultKind.LOST and not lost.located  # which stage is gone is not known yet
    results.report_failure(-1, lost)
    for future in (first, second):
        with pytest.raises(StageLostError, match="worker1 does not answer"):
            future.result(timeout=2)
    assert sorted(mb for mb, _ in pipeline.located) == [2002, 2003]


def test_a_step_past_the_deadline_is_located_once_and_a_delivered_one_is_forgotten(pipeline, results):
    delivered, late = pipeline._submit(_step(2004)), pipeline._submit(_step(2005))
    results.deliver(2004, [11])
    assert delivered.result(timeout=1) == [11]
    with pytest.raises(StageLostError):
        late.result(timeout=3)
    time.sleep(0.6)
    assert pipeline.located == [(2005, "micro-batch 2005 ran for more than 0.5 s")]


def test_a_stage_that_answers_but_makes_no_progress_is_down():
    from chatloop.engine import StageReport

    pipeline = _pipeline(Results(), names=(), num_blocks=1, timeout=20)
    fine = StageReport(name="worker1", index=1, computing_s=2.0, consecutive_failures=0)
    assert pipeline._judge(fine).up
    stuck = pipeline._judge(StageReport(name="worker1", index=1, host="h", computing_s=12.5))
    assert not stuck.up and "one micro-batch has been computing for 12 s" in stuck.error and stuck.host == "h"
    failing = pipeline._judge(StageReport(name="worker2", index=2, consecutive_failures=3, last_error="boom"))
    assert not failing.up and failing.error == "its last 3 micro-batches failed: boom"
    pipeline.close()


@pytest.mark.parametrize(("where", "waits"), [
    ([("forwarded", 9.0), ("queued", 8.0)], True),  # behind other steps: busy, not lost
    ([("forwarded", 9.0), ("computing", 0.3)], True),
    ([("forwarded", 9.0), ("computing", 0.7)], False),  # computed for longer than the timeout: fails
    ([("forwarded", 9.0), ("unseen", 9.0)], False),  # lost between the stages
])
def test_a_late_step_that_only_waits_its_turn_gets_the_timeout_again(monkeypatch, results, where, waits):
    pipeline = _pipeline(results)
    monkeypatch.setattr(pipeline, "locate", lambda mb_id, timeout=None: where)
    monkeypatch.setattr(pipeline, "cancel", lambda mb_ids: None)
    future = pipeline._submit(_step(2100))
    time.sleep(1.0)  # past the deadline: located (and re-armed, if it waits)
    if waits:
        assert not future.done() and 2100 in pipeline._sent
        results.deliver(2100, [4])
        assert future.result(timeout=1) == [4]
    else:
        with pytest.raises(StageError, match="worker1 did not finish micro-batch 2100") as e:
            future.result(timeout=2)
        # Every stage answered: the step took too long (its requests fail), no stage is lost.
        assert e.value.kind is FaultKind.TIMED_OUT and e.value.stage == 1 and not isinstance(e.value, StageLostError)
    pipeline.close()


def test_a_late_step_at_a_silent_stage_is_lost_there_and_the_watchdog_is_told(monkeypatch, results):
    pipeline = _pipeline(results, names=("worker0", "worker1", "worker2"), timeout=0.3, generation=7)
    told = []
    pipeline.on_silent = lambda stages, why, generation: told.append((stages, why, generation))
    monkeypatch.setattr(pipeline, "locate", lambda mb_id, timeout=None: [("forwarded", 1.0), "EOF", "EOF"])
    monkeypatch.setattr(pipeline, "cancel", lambda mb_ids: None)
    future = pipeline._submit(_step(2101))
    with pytest.raises(StageLostError, match="worker1, worker2 do not answer") as e:
        future.result(timeout=3)
    assert (e.value.kind, e.value.stage, e.value.generation) == (FaultKind.LOST, 1, 7)
    assert told == [([1, 2], "no answer: EOF", 7)]
    pipeline.close()


@pytest.mark.parametrize(("kind", "replayed"), [(FaultKind.LOST, True), (FaultKind.STALLED, True),
                                                (FaultKind.FAILED, False), (FaultKind.TIMED_OUT, False)])
def test_a_fault_s_kind_decides_whether_its_sequences_are_replayed_and_it_crosses_rpc_whole(kind, replayed):
    import pickle

    fault = stage_fault(kind, "worker2 did not finish micro-batch 9", stage=2, generation=3, cause="why")
    assert isinstance(fault, StageLostError) is replayed and isinstance(fault, StageError)
    back = pickle.loads(pickle.dumps(fault))  # as torch RPC sends a stage's report to the coordinator
    assert type(back) is type(fault) and str(back) == str(fault)
    assert (back.kind, back.stage, back.generation, back.cause) == (kind, 2, 3, "why")


def test_the_listener_serves_deliveries_and_failure_reports_and_refuses_anything_else(pipeline, results):
    delivered, failed = pipeline._submit(_step(2200)), pipeline._submit(_step(2201))
    results.serve_call("deliver", (2200, [3]))
    results.serve_call("failed", (2201, StageError("worker0 (layers 0-14) failed: boom", stage=0)))
    assert delivered.result(timeout=1) == [3]
    with pytest.raises(StageError, match="boom"):
        failed.result(timeout=1)
    with pytest.raises(ValueError, match="not 'forward'"):
        results.serve_call("forward", (1,))


def test_two_clusters_results_are_their_own():
    """Nothing lives at module level: a micro-batch id in flight in one is unknown to the other."""
    first, second = Results(), Results()
    a, b = first.expect(7), second.expect(7)
    first.deliver(7, [1])
    second.fail_all(StageLostError("the pipeline of generation 3 was lost", generation=3))
    assert a.result(timeout=1) == [1]
    with pytest.raises(StageLostError):
        b.result(timeout=1)
