"""The coordinator's scheduler: admission, continuous batching, micro-batches in flight, stopping.

One thread owns every sequence. Requests wait in a bounded queue; a request is admitted
when the running set has room (``max_batch_size``) and the block allocator can reserve its
whole length; admissions wait up to ``batching_window_ms`` for company. Running sequences
are cut into up to ``max_in_flight`` micro-batches so that every stage has work; a sequence
has at most one step in flight. Finished, failed and cancelled sequences free their blocks
at once, and waiting requests join at the next step.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..models.batch import StepBatch, padded
from .blocks import BlockAllocator
from .detokenizer import Detokenizer
from .pipeline import MicroBatch, Pipeline
from .sampling import SamplerInput, SamplingParams

__all__ = ["Scheduler", "QueueFullError", "SequenceEvent", "SchedulerStats"]


class QueueFullError(RuntimeError):
    """The request queue is full: retry later (HTTP 429)."""


@dataclass(frozen=True)
class SequenceEvent:
    """What a request's consumer receives: new text and token ids, then a final event."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last event
    error: BaseException | None = None


@dataclass
class SchedulerStats:
    """Counters the metrics endpoint reads."""

    num_waiting: int = 0
    num_running: int = 0
    num_in_flight: int = 0
    last_batch_size: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0


@dataclass(eq=False)
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    emit: Callable[[SequenceEvent], None]
    detokenizer: Detokenizer
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys and values are in the cache
    in_flight: bool = False
    cancelled: bool = False

    def next_step(self) -> tuple[list[int], int]:
        """The token ids to feed now and the position of the first one."""
        if self.num_cached == 0:
            return self.prompt_ids, 0
        return [self.output_ids[-1]], self.num_cached


class Scheduler:
    """Drives a :class:`Pipeline`; ``submit`` is thread-safe and returns a cancel function."""

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer,
        *,
        max_batch_size: int = 16,
        batching_window_ms: float = 5.0,
        max_queue_size: int = 256,
        max_in_flight: int | None = None,
        max_context: int | None = None,
        max_tokens_per_micro_batch: int = 4096,
        eos_token_ids: set[int] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.allocator = BlockAllocator(pipeline.num_blocks, pipeline.block_size)
        self.max_batch_size = max_batch_size
        self.batching_window = batching_window_ms / 1000
        self.max_queue_size = max_queue_size
        self.max_in_flight = max_in_flight or pipeline.num_stages
        self.max_context = max_context
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.eos_token_ids = eos_token_ids or set()
        self.stats = SchedulerStats()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._completed: list[tuple[MicroBatch, list[_Sequence], object]] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="chatloop-scheduler", daemon=True)
        self._thread.start()

    # ---- the consumer side -------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[SequenceEvent], None]) -> Callable[[], None]:
        """Queue a request; ``emit`` receives its events on the scheduler thread. Returns ``cancel()``."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: send at least one token")
        total = len(prompt_ids) + params.max_new_tokens
        if self.max_context is not None and total > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"the model's context of {self.max_context} tokens: shorten the prompt or lower max_new_tokens"
            )
        if total > self.allocator.capacity_tokens:
            raise ValueError(
                f"prompt + max_new_tokens = {total} tokens exceeds the KV cache's {self.allocator.capacity_tokens} "
                f"tokens: lower max_new_tokens or raise cache.kv_cache_mb"
            )
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = _Sequence(next(self._ids), list(prompt_ids), params, seed, emit, Detokenizer(self.tokenizer, params.stop))
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is shut down")
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFullError(f"the request queue is full ({self.max_queue_size} waiting): retry later")
            self._waiting.append(seq)
            self._cond.notify()

        def cancel() -> None:
            with self._cond:
                seq.cancelled = True
                self._cond.notify()

        return cancel

    def close(self) -> None:
        """Stop the loop; queued and running requests end with ``finish_reason="cancelled"``."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the scheduler thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                timeout = self._wait_time()
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)
                if self._closing:
                    break
                completed, self._completed = self._completed, []
                cancelled = [s for s in self._waiting if s.cancelled]
                for seq in cancelled:
                    self._waiting.remove(seq)
            for seq in cancelled:
                self._finish(seq, "cancelled")
            for micro_batch, seqs, result in completed:
                self._on_result(micro_batch, seqs, result)
            for seq in [s for s in self._running if s.cancelled and not s.in_flight]:
                self._finish(seq, "cancelled")
            self._admit()
            self._launch()
            self._update_stats()
        for seq in list(self._waiting) + self._running:
            self._finish(seq, "cancelled", release=False)

    def _wait_time(self) -> float | None:
        """Seconds until there may be something to do (0: now; None: until notified)."""
        # A cancelled sequence still in flight is finished when its step returns: no busy wait.
        if self._completed or self._closing or any(s.cancelled and not s.in_flight for s in self._running):
            return 0
        if self._can_launch():
            return 0
        if self._waiting and len(self._running) < self.max_batch_size and self._has_blocks_for(self._waiting[0]):
            age = time.monotonic() - self._waiting[0].arrival
            return max(0.0, self.batching_window - age)
        return None

    def _has_blocks_for(self, seq: _Sequence) -> bool:
        return self.allocator.blocks_for(len(seq.prompt_ids) + seq.params.max_new_tokens) <= self.allocator.num_free

    def _admit(self) -> None:
        with self._cond:
            if not self._waiting:
                return
            room = self.max_batch_size - len(self._running)
            # Wait for company for up to the batching window, unless the batch is full already.
            if len(self._waiting) < room and time.monotonic() - self._waiting[0].arrival < self.batching_window:
                return
            while self._waiting and len(self._running) < self.max_batch_size:
                seq = self._waiting[0]
                blocks = self.allocator.allocate(len(seq.prompt_ids) + seq.params.max_new_tokens)
                if blocks is None:
                    break  # first come, first served: later requests do not overtake
                self._waiting.popleft()
                seq.blocks = blocks
                self._running.append(seq)

    def _ready(self) -> list[_Sequence]:
        return [s for s in self._running if not s.in_flight and not s.cancelled]

    def _can_launch(self) -> bool:
        return self.stats.num_in_flight < self.max_in_flight and bool(self._ready())

    def _launch(self) -> None:
        while self.stats.num_in_flight < self.max_in_flight:
            ready = self._ready()
            if not ready:
                return
            # Prefills and decodes go in separate micro-batches: a decode padded to a prompt's length wastes work.
            prefill = [s for s in ready if s.num_cached == 0]
            group = prefill or ready
            cap = max(1, math.ceil(len(self._running) / self.max_in_flight))
            chosen: list[_Sequence] = []
            for seq in group[:cap]:
                longest = max([len(seq.next_step()[0])] + [len(s.next_step()[0]) for s in chosen])
                if chosen and longest * (len(chosen) + 1) > self.max_tokens_per_micro_batch:
                    break
                chosen.append(seq)
            self._send(chosen)

    def _send(self, seqs: list[_Sequence]) -> None:
        steps = [s.next_step() for s in seqs]
        lengths = [len(ids) for ids, _ in steps]
        token_ids = padded([ids for ids, _ in steps])
        needed = [self.allocator.blocks_for(start + n) for (_, start), n in zip(steps, lengths)]
        batch = StepBatch.build(
            [start for _, start in steps], lengths, [s.blocks[:k] for s, k in zip(seqs, needed)], self.allocator.block_size
        )
        sampling = [
            SamplerInput(
                s.params.temperature, s.params.top_k, s.params.top_p, s.params.repetition_penalty, s.seed, len(s.output_ids),
                tuple(s.prompt_ids + s.output_ids) if s.params.repetition_penalty != 1.0 else (),
            )
            for s in seqs
        ]
        micro_batch = MicroBatch(next(self._ids), token_ids, batch, sampling)
        for s in seqs:
            s.in_flight = True
        self.stats.num_in_flight += 1
        self.stats.last_batch_size = len(seqs)
        try:
            future = self.pipeline.submit(micro_batch)
        except Exception as e:  # the transport refused at once (e.g. a dead worker)
            self._on_result(micro_batch, seqs, e)
            return
        future.add_done_callback(lambda f: self._complete(micro_batch, seqs, f))

    def _complete(self, micro_batch: MicroBatch, seqs: list[_Sequence], future) -> None:
        error = future.exception()
        with self._cond:
            self._completed.append((micro_batch, seqs, error if error is not None else future.result()))
            self._cond.notify()

    def _on_result(self, micro_batch: MicroBatch, seqs: list[_Sequence], result) -> None:
        self.stats.num_in_flight -= 1
        new_tokens = micro_batch.batch.valid.sum(dim=1).tolist()
        for b, seq in enumerate(seqs):
            seq.in_flight = False
            if isinstance(result, BaseException):
                self._finish(seq, "error", error=result)
                continue
            seq.num_cached += new_tokens[b]
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            self._accept(seq, int(result[b]))

    def _accept(self, seq: _Sequence, token: int) -> None:
        self.stats.generated_tokens += 1
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.output_ids.append(token)
        text, stopped = seq.detokenizer.add(token)
        if stopped:
            self._finish(seq, "stop", text=text)
        elif len(seq.output_ids) >= seq.params.max_new_tokens:
            self._finish(seq, "length", text=text, token=token)
        else:
            seq.emit(SequenceEvent(text, (token,)))

    def _finish(self, seq: _Sequence, reason: str, *, text: str = "", token: int | None = None, error=None, release=True) -> None:
        if release and seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        if seq in self._running:
            self._running.remove(seq)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if reason in ("stop", "length"):
            text += seq.detokenizer.flush()
        seq.emit(SequenceEvent(text, () if token is None else (token,), finish_reason=reason, error=error))

    def _update_stats(self) -> None:
        self.stats.num_waiting = len(self._waiting)
        self.stats.num_running = len(self._running)
