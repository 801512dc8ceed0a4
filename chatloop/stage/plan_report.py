"""The plan as the status page shows it (issue 24, point 4): each host's probe figures, its layers, the predicted
tokens/s at batch 1 and at the batch size, and beside them the measured ones (:class:`DecodeMeter`)."""

from __future__ import annotations

import bisect
import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from typing import Any

from ..engine.pipeline import StepRecord
from ..partition.placement import HostFigures, Placement, layer_seconds

__all__ = ["DecodeMeter", "plan_report"]

IDLE_S = 0.5
"""A pause longer than this between decode steps is idle time (no request), not the coordinator's share of a step."""
WINDOW_S = 30.0
"""The measured figures are those of the decode steps in the last this many seconds of decoding."""


class DecodeMeter:
    """A step observer (``Pipeline.add_observer``) that keeps the recent decode steps and measures their tokens/s.

    At the batch: the steps sent at the fullest load of the window (the most sequences in flight), their sequences
    over the time from one's answer to the next's (gaps over :data:`IDLE_S`, no request, left out). At batch 1: the
    same over the steps of a lone sequence (one micro-batch of one sequence, nothing else in flight). The window
    ends at the last decode step, so the figures of a finished run stay until the next.
    """

    def __init__(self, max_steps: int = 512) -> None:
        self._steps: deque[StepRecord] = deque(maxlen=max_steps)
        self._lock = threading.Lock()

    def __call__(self, record: StepRecord) -> None:
        if not record.failed and record.num_tokens == 1:  # decode steps only (a prefill's columns are its prompt)
            with self._lock:
                self._steps.append(record)

    def measured(self) -> dict[str, float | None]:
        """``tokens_per_s`` at the fullest load of the window, ``sequences`` (that load: the sequences in flight),
        ``tokens_per_s_1`` (a lone sequence), ``coordinator_ms`` (the coordinator's share of a step at that load:
        the median time from a step's sending back to the answer before it, the scheduler's turn); None where no
        step measured it."""
        with self._lock:
            steps = sorted(self._steps, key=lambda r: r.sent)
        if steps:
            last = max(r.done for r in steps)
            steps = [r for r in steps if r.done >= last - WINDOW_S]
        out: dict[str, float | None] = {"tokens_per_s": None, "sequences": None, "tokens_per_s_1": None,
                                        "coordinator_ms": None}
        if not steps:
            return out
        in_flight = [sum(o.num_sequences for o in steps if o.sent <= r.sent < o.done) for r in steps]
        full = max(in_flight)  # the load the configured batch stands for (a run's ramp and tail have fewer)
        out["sequences"] = full
        out["tokens_per_s"] = _pace([r for r, n in zip(steps, in_flight) if n == full])
        lone = [r for r, n in zip(steps, in_flight) if n == 1 and r.num_sequences == 1]
        out["tokens_per_s_1"] = _pace(lone) if full > 1 else out["tokens_per_s"]
        answers = sorted(r.done for r in steps)
        turns = []
        for r, n in zip(steps, in_flight):
            k = bisect.bisect_right(answers, r.sent)
            if n == full and k and r.sent - answers[k - 1] <= IDLE_S:
                turns.append(r.sent - answers[k - 1])
        out["coordinator_ms"] = statistics.median(turns) * 1e3 if turns else None
        return out


def _pace(steps: list[StepRecord]) -> float | None:
    """Sequences a second from one step's answer to the next's (a step's tokens counted when it is answered: the
    interval includes the coordinator's share), leaving out pauses over :data:`IDLE_S`."""
    tokens, seconds = 0, 0.0
    for a, b in pairwise(sorted(steps, key=lambda r: r.done)):
        if b.done - a.done <= IDLE_S:
            tokens, seconds = tokens + b.num_sequences, seconds + b.done - a.done
    return tokens / seconds if seconds > 0 else None


def plan_report(plan: str, placement: Placement | None, figures: Sequence[HostFigures],
                meter: DecodeMeter | None) -> dict[str, Any]:
    """The status document's ``plan``: ``plan`` (``auto``, ``even`` or ``ranges``), and under ``auto`` the stages in
    chain order with their host's figures and predicted step times, the hosts left out, the predicted tokens/s;
    ``measured`` from ``meter`` in every case (even and explicit ranges have no prediction)."""
    measured = meter.measured() if meter is not None else None
    report: dict[str, Any] = {"plan": plan, "measured": measured}
    if placement is None:
        report["note"] = ("the layers are split evenly" if plan == "even" else "the layers are the ranges "
                          "cluster.workers lists") + ": no host figures or prediction (cluster.plan=auto plans them)"
        return report
    if measured is not None and measured["coordinator_ms"] is not None:  # the prediction's one measured term
        placement = replace(placement, coordinator_s=measured["coordinator_ms"] / 1e3)
    by_name = {f.name: f for f in figures}
    in_order = len(figures) == len(placement.stages)  # every host kept: the figures in chain order, whatever names
    stages = []
    for k, stage in enumerate(placement.stages):
        f = figures[k] if in_order else by_name.get(stage.host)
        host = {} if f is None else {
            "threads": f.threads, "cores": f.cores, "cpu_limit": f.cpu_limit, "memory_bytes": f.memory_bytes,
            "bandwidth_gb_s": f.bandwidth_gb_s, "hop_ms": f.hop_s * 1e3,
            "layer_ms": _ms(f.decode_s),
            "layer_ms_at_micro_batch": layer_seconds(f.decode_s, placement.micro_batch) * 1e3,
            "fixed_ms": _ms(f.step_fixed_s), "head_ms": _ms(f.head_s),
            "prefill_ms_per_token": None if f.prefill_s_per_token is None else f.prefill_s_per_token * 1e3,
        }
        stages.append({"host": stage.host, "layers": str(stage.layers), "num_layers": len(stage.layers),
                       "step_ms_1": stage.step_1_s * 1e3, "step_ms": stage.step_s * 1e3,
                       "stage_memory_bytes": stage.memory_bytes, **host})
    report.update({
        "batch": placement.batch, "micro_batches": placement.micro_batches, "micro_batch": placement.micro_batch,
        "predicted": {"tokens_per_s_1": placement.tokens_per_s_1, "tokens_per_s": placement.tokens_per_s,
                      "coordinator_ms": placement.coordinator_s * 1e3},
        "stages": stages, "left_out": dict(placement.left_out),
    })
    return report


def _ms(by_batch) -> dict[str, float] | None:
    return None if by_batch is None else {str(b): t * 1e3 for b, t in sorted(by_batch.items())}
