"""The coordinator's inbox for the last stage's answers: each micro-batch resolves once, first answer wins."""

from __future__ import annotations

import pytest
import torch

from chatloop.engine import StageError
from chatloop.runtime import results


def test_delivered_tokens_resolve_the_micro_batch_and_a_later_failure_is_ignored():
    future = results.expect(1001)
    results.deliver(1001, [5, 7])
    results.fail(1001, RuntimeError("the chain finished late"))  # arrives after the tokens: no effect
    assert future.result(timeout=1) == [5, 7]
    results.deliver(1001, [9])  # a duplicate or unknown micro-batch is dropped
    results.deliver(424242, [1])


def test_a_failure_first_resolves_with_the_error_and_late_tokens_are_dropped():
    future = results.expect(1002)
    results.fail(1002, RuntimeError("worker2 failed"))
    results.deliver(1002, [1])
    with pytest.raises(RuntimeError, match="worker2 failed"):
        future.result(timeout=1)


def test_a_micro_batch_id_is_in_flight_once():
    results.expect(1003)
    with pytest.raises(AssertionError, match="already in flight"):
        results.expect(1003)
    results.deliver(1003, [])


@pytest.mark.parametrize("outcome", ["value", "raised"])
def test_raise_failure_raises_errors_that_rpc_returns_as_values(outcome):
    future = torch.futures.Future()
    error = ValueError("connection reset")
    future.set_result(error) if outcome == "value" else future.set_exception(error)
    with pytest.raises(StageError, match="^worker1: connection reset$"):  # named after the stage it called
        results.raise_failure(future, "worker1")
    ok = torch.futures.Future()
    ok.set_result(None)
    results.raise_failure(ok, "worker1")  # success raises nothing


def test_raise_failure_keeps_a_stage_error_and_a_named_transport_error_as_they_are():
    own = torch.futures.Future()
    own.set_result(StageError("worker2 (layers 16-22) failed: RuntimeError: bad shape"))
    with pytest.raises(StageError, match="^worker2 \\(layers 16-22\\) failed"):
        results.raise_failure(own, "worker1")
    named = torch.futures.Future()
    named.set_exception(RuntimeError("worker1 is unreachable"))
    with pytest.raises(StageError, match="^worker1 is unreachable$"):
        results.raise_failure(named, "worker1")


def test_a_stage_that_answers_but_makes_no_progress_is_down():
    from chatloop.engine import StageReport
    from chatloop.runtime.cluster import RpcPipeline

    pipeline = RpcPipeline([], num_blocks=1, block_size=16, timeout=20, progress_deadline_s=10)
    fine = StageReport(name="worker1", index=1, computing_s=2.0, consecutive_failures=0)
    assert pipeline._judge(fine).up
    stuck = pipeline._judge(StageReport(name="worker1", index=1, host="h", computing_s=12.5))
    assert not stuck.up and "one micro-batch has been computing for 12 s" in stuck.error and stuck.host == "h"
    failing = pipeline._judge(StageReport(name="worker2", index=2, consecutive_failures=3, last_error="boom"))
    assert not failing.up and failing.error == "its last 3 micro-batches failed: boom"
    pipeline.close()
