"""The decode meter behind the status page's measured tokens/s (issue 24, point 4), on made-up step records."""

from __future__ import annotations

import pytest

from chatloop.engine.pipeline import StepRecord
from chatloop.stage.plan_report import DecodeMeter, plan_report


def _step(k: int, sent: float, done: float, sequences: int, tokens: int = 1, failed: bool = False) -> StepRecord:
    return StepRecord(micro_batch=k, num_sequences=sequences, num_tokens=tokens, sent=sent, done=done, failed=failed)


def test_nothing_measured_before_a_decode_step():
    meter = DecodeMeter()
    meter(_step(0, 0.0, 0.5, 4, tokens=30))  # a prefill
    assert meter.measured() == {"tokens_per_s": None, "sequences": None, "tokens_per_s_1": None,
                                "coordinator_ms": None}


def test_batch_throughput_counts_the_busy_time_and_the_sequences_in_flight():
    meter = DecodeMeter()
    # two micro-batches of 8 in flight, each step 1/8 s, one answered every 1/16 s: 128 tokens/s once both are in
    # flight (the first step, sent alone, is the ramp)
    for k, sent in enumerate((0.0, 0.0625, 0.125, 0.1875)):
        meter(_step(k, sent, sent + 0.125, 8))
    meter(_step(9, 0.25, 0.375, 8, failed=True))  # a failed step counts no tokens
    got = meter.measured()
    assert got["tokens_per_s"] == pytest.approx(128)
    assert got["sequences"] == 16
    assert got["tokens_per_s_1"] is None  # never one sequence alone
    assert got["coordinator_ms"] == 0  # each step sent as the one before it was answered


def test_a_lone_sequence_is_timed_from_step_to_step_and_idle_time_is_left_out():
    meter = DecodeMeter()
    for k, sent in enumerate((0.0, 0.02, 0.04)):  # 10 ms a step, 10 ms of the coordinator's between
        meter(_step(k + 10, sent + 0.005, sent + 0.008, 2, tokens=7))  # a prefill meanwhile: not counted
        meter(_step(k, sent, sent + 0.01, 1))
    meter(_step(3, 2.04, 2.05, 1))  # after 2 s without a request
    got = meter.measured()
    assert got["tokens_per_s_1"] == pytest.approx(50.0)
    assert got["coordinator_ms"] == pytest.approx(10.0)  # from an answer to the next step's sending
    assert got["tokens_per_s"] == got["tokens_per_s_1"] and got["sequences"] == 1


def test_even_plans_say_they_predict_nothing():
    report = plan_report("even", None, [], DecodeMeter())
    assert report["plan"] == "even" and "stages" not in report and "cluster.plan=auto" in report["note"]
    assert "cluster.workers" in plan_report("ranges", None, [], None)["note"]
