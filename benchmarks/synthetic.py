"""The real scheduler driving sleeping stages: does the schedule keep a pipeline busy, apart from the CPU?

On 2 cores, real workers compete for the cores, so a slow pipeline may be the machine and not
the schedule. Here each of S stages is a thread that sleeps a fixed time per micro-batch
(``stage_ms``, plus ``per_sequence_ms`` per sequence), so stages overlap like processes on
separate machines and cost no CPU. The real :class:`chatloop.engine.Scheduler` drives them.

Ideal: some stage never waits, so the run takes that stage's measured time plus the pipeline's
fill and drain. ``ratio = ideal / measured``: with S micro-batches in flight it should be
close to 1; with one in flight it is about 1/S. (``nominal_ratio`` uses the nominal sleep
times instead: a loaded machine wakes sleeping threads late, which lowers it.)

    python -m benchmarks.synthetic --stages 1 2 4 8 --stage-ms 10
    python -m benchmarks.synthetic --stages 4 --in-flight 1 2 4
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from chatloop.engine import MicroBatch, Pipeline, SamplingParams, Scheduler, StageReport, StageTiming

__all__ = ["SleepingPipeline", "SyntheticResult", "run_synthetic", "main"]


class _NullTokenizer:
    """Enough of a tokenizer for the scheduler's detokenizer."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


class SleepingPipeline(Pipeline):
    """A :class:`chatloop.engine.Pipeline` of ``num_stages`` threads that sleep instead of computing.

    Stage k takes ``stage_s + per_sequence_s * sequences`` per micro-batch, one micro-batch at a
    time, then hands it to stage k + 1; the last resolves the future with one token per sequence.
    """

    def __init__(
        self,
        num_stages: int,
        stage_s: float,
        per_sequence_s: float = 0.0,
        token_id: int = 7,
        num_blocks: int = 4096,
        block_size: int = 16,
    ) -> None:
        if num_stages < 1:
            raise ValueError(f"num_stages={num_stages}: need at least 1 stage")
        super().__init__([f"sleeping{k}" for k in range(num_stages)], num_blocks, block_size)
        self.stage_s, self.per_sequence_s, self.token_id = stage_s, per_sequence_s, token_id
        self._stages = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sleeping-stage{k}") for k in range(num_stages)
        ]
        self._lock = threading.Lock()
        self.timings: list[list[tuple[int, float, float]]] = [[] for _ in range(num_stages)]
        self.micro_batches: list[tuple[int, int]] = []  # (id, sequences) in submission order

    def cost(self, num_sequences: int) -> float:
        return self.stage_s + self.per_sequence_s * num_sequences

    def _submit(self, micro_batch: MicroBatch) -> Future:
        future: Future = Future()
        with self._lock:
            self.micro_batches.append((micro_batch.id, micro_batch.token_ids.shape[0]))
        self._stages[0].submit(self._work, 0, micro_batch, future)
        return future

    def _work(self, k: int, mb: MicroBatch, future: Future) -> None:
        start = time.perf_counter()
        time.sleep(self.cost(mb.token_ids.shape[0]))
        self.timings[k].append((mb.id, start, time.perf_counter()))
        if k + 1 < self.num_stages:
            self._stages[k + 1].submit(self._work, k + 1, mb, future)
        else:
            future.set_result([self.token_id] * mb.token_ids.shape[0])

    def describe(self, timeout: float) -> list[StageReport]:
        return [StageReport(name=name, index=k, in_process=True) for k, name in enumerate(self.stage_names)]

    def take_timings(self) -> dict[str, list[StageTiming]]:
        """Each stage's (micro-batch, start, end) in perf_counter seconds, kept (``timings`` holds them too)."""
        return {name: [StageTiming(*t) for t in rows] for name, rows in zip(self.stage_names, self.timings)}

    def inject_failure(self, stage: int, message: str = "injected", stall_s: float = 0.0) -> None:
        raise NotImplementedError("a sleeping pipeline does not fail")

    def close(self) -> None:
        for stage in self._stages:
            stage.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class SyntheticResult:
    """One synthetic run; ``ratio`` is ideal time / measured time (1.0: the busiest stage never waited)."""

    num_stages: int
    stage_ms: float
    per_sequence_ms: float
    num_sequences: int
    max_in_flight: int
    new_tokens: int
    num_micro_batches: int
    mean_sequences_per_micro_batch: float
    elapsed_s: float
    ideal_s: float
    ratio: float
    nominal_ratio: float
    tokens_per_s: float
    busy_fractions: tuple[float, ...]


def _ideal_time(timings: list[list[tuple[int, float, float]]]) -> float:
    """The shortest possible run given the stages' measured times: some stage k never waits.

    Stage k cannot start before the first micro-batch has passed stages 0..k-1, works for the
    sum of its own times, and the last micro-batch still has to pass stages k+1.. after it.
    """

    def duration(rows, index):
        return rows[index][2] - rows[index][1] if rows else 0.0

    bounds = []
    for k, rows in enumerate(timings):
        fill = sum(duration(timings[j], 0) for j in range(k))
        drain = sum(duration(timings[j], -1) for j in range(k + 1, len(timings)))
        bounds.append(fill + sum(e - s for _, s, e in rows) + drain)
    return max(bounds)


def run_synthetic(
    num_stages: int = 4,
    stage_ms: float = 10.0,
    *,
    per_sequence_ms: float = 0.0,
    num_sequences: int | None = None,
    max_in_flight: int | None = None,
    new_tokens: int = 25,
    prompt_tokens: int = 4,
    batching_window_ms: float = 5.0,
    timeout_s: float = 120.0,
) -> SyntheticResult:
    """Offer ``num_sequences`` requests (default: one per stage) at once and time them through the sleeping stages."""
    num_sequences = num_sequences or num_stages
    pipeline = SleepingPipeline(num_stages, stage_ms / 1e3, per_sequence_ms / 1e3)
    scheduler = Scheduler(
        pipeline,
        _NullTokenizer(),
        max_batch_size=num_sequences,
        batching_window_ms=batching_window_ms,
        max_in_flight=max_in_flight,
    )
    finished = threading.Semaphore(0)
    errors: list[str] = []

    def emit(event) -> None:
        if event.finish_reason is not None:
            if event.finish_reason != "length":
                errors.append(f"a request ended with {event.finish_reason}: {event.error}")
            finished.release()

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    try:
        started = time.perf_counter()
        for _ in range(num_sequences):
            scheduler.submit(list(range(1, prompt_tokens + 1)), params, emit)
        for _ in range(num_sequences):
            if not finished.acquire(timeout=timeout_s):
                raise TimeoutError(f"the synthetic run did not finish in {timeout_s:.0f} s")
        elapsed = time.perf_counter() - started
    finally:
        scheduler.close()
        pipeline.close()
    if errors:
        raise RuntimeError(errors[0])
    sizes = [n for _, n in pipeline.micro_batches]
    ideal = _ideal_time(pipeline.timings)
    # The same bound from the nominal costs (a loaded machine wakes sleeping threads late; this counts that too).
    nominal = sum(pipeline.cost(n) for n in sizes) + (num_stages - 1) * pipeline.cost(sizes[-1])
    busy = tuple(sum(e - s for _, s, e in rows) / elapsed for rows in pipeline.timings)
    return SyntheticResult(
        num_stages=num_stages,
        stage_ms=stage_ms,
        per_sequence_ms=per_sequence_ms,
        num_sequences=num_sequences,
        max_in_flight=scheduler.max_in_flight,
        new_tokens=new_tokens,
        num_micro_batches=len(sizes),
        mean_sequences_per_micro_batch=sum(sizes) / len(sizes),
        elapsed_s=elapsed,
        ideal_s=ideal,
        ratio=ideal / elapsed,
        nominal_ratio=nominal / elapsed,
        tokens_per_s=num_sequences * new_tokens / elapsed,
        busy_fractions=busy,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--in-flight", type=int, nargs="+", default=[0], help="micro-batches in flight; 0: one per stage"
    )
    parser.add_argument("--sequences", type=int, default=0, help="requests; 0: one per stage")
    parser.add_argument("--stage-ms", type=float, default=10.0)
    parser.add_argument("--per-sequence-ms", type=float, default=0.0)
    parser.add_argument("--new-tokens", type=int, default=25)
    parser.add_argument("--json", action="store_true", help="one JSON line per run instead of a table")
    ns = parser.parse_args(argv)
    if not ns.json:
        print(
            "| stages | in flight | sequences | micro-batches | seq/mb | elapsed s | ideal s | ratio | nominal ratio "
            "| tok/s | busy % per stage |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for stages in ns.stages:
        for in_flight in ns.in_flight:
            r = run_synthetic(
                stages,
                ns.stage_ms,
                per_sequence_ms=ns.per_sequence_ms,
                num_sequences=ns.sequences or None,
                max_in_flight=in_flight or None,
                new_tokens=ns.new_tokens,
            )
            if ns.json:
                import json

                print(json.dumps(asdict(r)))
                continue
            print(
                f"| {r.num_stages} | {r.max_in_flight} | {r.num_sequences} | {r.num_micro_batches} "
                f"| {r.mean_sequences_per_micro_batch:.1f} | "
                f"{r.elapsed_s:.3f} | {r.ideal_s:.3f} | {r.ratio:.3f} | {r.nominal_ratio:.3f} | {r.tokens_per_s:.1f} | "
                f"{' / '.join(f'{b * 100:.0f}' for b in r.busy_fractions)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
