"""The real scheduler keeps a pipeline of sleeping stages busy (benchmarks/synthetic.py), apart from the CPU."""

from __future__ import annotations

from benchmarks.synthetic import run_synthetic


def test_four_stages_with_four_micro_batches_in_flight_reach_90_percent_of_ideal():
    # Best of three: a timing check on a shared 2-core machine, where another process can delay a wake-up.
    runs = [run_synthetic(num_stages=4, stage_ms=10, new_tokens=25) for _ in range(3)]
    for result in runs:
        assert result.max_in_flight == 4
        assert result.num_micro_batches == 4 * 25  # one sequence per micro-batch, one micro-batch per token
    # One run must keep the pipeline full: >= 90% of ideal throughput with every stage >= 80% busy.
    assert any(r.ratio >= 0.9 and min(r.busy_fractions) >= 0.8 for r in runs), runs


def test_one_micro_batch_in_flight_leaves_three_of_four_stages_idle():
    # The measurement can tell a pipelined schedule from a sequential one.
    result = run_synthetic(num_stages=4, stage_ms=5, new_tokens=20, max_in_flight=1)
    assert result.num_micro_batches == 20
    assert result.ratio < 0.35, result
