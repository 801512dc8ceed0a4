"""The coordinator's scheduler: one thread that drives the :class:`SchedulerPolicy` against a :class:`Pipeline`.

The policy decides (admission, micro-batches, stopping); this driver owns the thread, the
lock and the clock, turns each :class:`Step` into a :class:`MicroBatch` of tensors, submits it,
feeds the results back, and hands every event to its request's ``emit``. A step's successors
are launched before its events are delivered, so consumers never delay the pipeline.

Speculative decoding: a step with drafts to make gets them from its proposers first, an n-gram lookup on this
thread, a draft model on the draft's own thread (the step is launched from there once drafted). A draft model that
fails turns its method off with a warning; the step goes on without drafts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace

from ..models.batch import StepBatch, padded
from .blocks import BlockAllocator
from .errors import SchedulerClosedError, StageLostError
from .pipeline import MicroBatch, Pipeline
from .policy import Output, SchedulerPolicy, SchedulerStats, Step
from .requests import SamplingParams, SequenceEvent
from .speculation import Draft, DraftRequest, NgramProposer, Proposer

__all__ = ["Emit", "Scheduler"]

log = logging.getLogger(__name__)

LOST_STEP_RETRY_S = 0.25
"""After a lost step, how long the scheduler waits before it launches again (the watchdog suspends it meanwhile)."""

Emit = Callable[[SequenceEvent], None]
"""Receives a request's events on the scheduler thread: must not block."""


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
        prefill_chunk_tokens: int | None = None,
        eos_token_ids: set[int] | None = None,
        kv_window: int | None = None,
        mixed_window: int | None = None,
        rope_switch: int | None = None,
        replay_lost_steps: bool = False,
        prefix_caching: bool = True,
        speculative_method: str | None = None,
        num_speculative_tokens: int = 4,
        draft_proposer: Proposer | None = None,
        draft_executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.allocator = BlockAllocator(pipeline.num_blocks, pipeline.block_size)
        # A model that mixes windowed and full layers, on stages that keep its windowed layers in a pool of their own
        # (cache.kv_cache_mb split per stage, see chatloop.stage.runner.kv_pools): a second block space.
        if pipeline.num_window_blocks and mixed_window is None:
            raise ValueError("the pipeline's stages keep their windowed layers in a pool of their own: pass the "
                             "model's mixed_window (ModelArgs.mixed_window) for the window tables")
        self.mixed_window = mixed_window if pipeline.num_window_blocks else None
        self.window_allocator = (BlockAllocator(pipeline.num_window_blocks, pipeline.block_size)
                                 if self.mixed_window is not None else None)
        self.policy = SchedulerPolicy(
            self.allocator, tokenizer, max_batch_size=max_batch_size, batching_window_s=batching_window_ms / 1000,
            max_queue_size=max_queue_size, max_in_flight=max_in_flight or pipeline.num_stages, max_context=max_context,
            max_tokens_per_micro_batch=max_tokens_per_micro_batch, prefill_chunk_tokens=prefill_chunk_tokens,
            eos_token_ids=eos_token_ids or set(), kv_window=kv_window,
            rope_switch=rope_switch, prefix_caching=prefix_caching,
            speculative_method=speculative_method, num_speculative_tokens=num_speculative_tokens,
            draft_methods=frozenset({"ngram", "draft"} if draft_proposer is not None else {"ngram"}),
            window_allocator=self.window_allocator, mixed_window=self.mixed_window,
        )
        self.proposers: dict[str, Proposer] = {"ngram": NgramProposer()}
        """Who drafts, by ``speculative.method``; a draft model (``draft``) runs on ``draft_executor``."""
        if draft_proposer is not None:
            self.proposers["draft"] = draft_proposer
        self._draft_executor = draft_executor
        self._clock = clock
        self.replay_lost_steps = replay_lost_steps
        """A step lost between stages (``StageLostError``) requeues its sequences instead of failing them: the
        pipeline heals itself (chatloop.runtime.healing)."""
        self._suspended = False
        self._emitters: dict[int, Emit] = {}
        self._completed: list[tuple[Step, list[int] | BaseException]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="chatloop-scheduler", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> SchedulerStats:
        return self.policy.stats

    @property
    def max_in_flight(self) -> int:
        return self.policy.max_in_flight

    # ---- the consumer side -------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Emit) -> Callable[[], None]:
        """Queue a request; ``emit`` receives its events on the scheduler thread. Returns ``cancel()``.

        Raises :class:`RequestError` subclasses for a request that cannot run, :class:`QueueFullError`
        when the queue is full and :class:`SchedulerClosedError` after :meth:`close`.
        """
        with self._cond:
            if self._closing:
                raise SchedulerClosedError("the scheduler is shut down")
            sequence_id = self.policy.add(list(prompt_ids), params, self._clock())
            self._emitters[sequence_id] = emit
            self._cond.notify()

        def cancel() -> None:
            with self._cond:
                self.policy.cancel(sequence_id)
                self._cond.notify()

        return cancel

    # ---- a lost pipeline ----------------------------------------------------------------------
    def suspend(self, reason: str) -> int:
        """The pipeline is lost: launch nothing; every running sequence waits to be prefilled again. Returns how many.

        Requests keep arriving (and being cancelled, or expiring) meanwhile; clients see a delay.
        """
        with self._cond:
            self._suspended = True
            self.policy.paused_reason = reason
            self._completed.clear()
            replayed = self.policy.requeue_all()
            self._cond.notify()
        return replayed

    def resume(self, pipeline: Pipeline) -> None:
        """Carry on with a new pipeline (same stages); the requeued sequences are prefilled again first. Those its
        pools can never hold (smaller than the old ones) end with a ContextLengthError."""
        if self.window_allocator is not None and not pipeline.num_window_blocks:  # refused before anything changes
            raise ValueError("the rebuilt pipeline keeps no windowed layers' pool: its stages must be built from the "
                             "same configuration")
        with self._cond:
            self.pipeline = pipeline
            self.policy.clear_prefix_cache()  # (emptied when the pipeline was lost: the new one's pools start empty)
            if (pipeline.num_blocks, pipeline.block_size) != (self.allocator.num_blocks, self.allocator.block_size):
                # Every sequence was requeued: none holds a block of the old pool.
                self.allocator = BlockAllocator(pipeline.num_blocks, pipeline.block_size)
                self.policy.allocator = self.allocator
            if self.window_allocator is not None and pipeline.num_window_blocks != self.window_allocator.num_blocks:
                self.window_allocator = BlockAllocator(pipeline.num_window_blocks, pipeline.block_size)
                self.policy.window_allocator = self.window_allocator
            unfit = self.policy.fail_unfit()
            self._suspended = False
            self.policy.paused_reason = ""
            self._cond.notify()
        self._deliver(unfit)

    def set_prefix_caching(self, on: bool) -> bool:
        """Turn prefix caching on or off from now on, with an empty cache (benchmarks compare both on one engine).
        Returns whether it is on."""
        with self._cond:
            policy = self.policy
            policy.prefix_caching = on
            policy.clear_prefix_cache()
            return policy.prefix_caching

    def fail_all(self, error: BaseException) -> None:
        """End every waiting and running request with ``error`` (the cluster cannot serve them now)."""
        with self._cond:
            outputs = self.policy.fail_all(error)
        self._deliver(outputs)

    @property
    def suspended(self) -> bool:
        return self._suspended

    def close(self) -> None:
        """Stop the loop; queued and running requests end with ``FinishReason.CANCELLED``."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                launch = not self._suspended
                timeout = (0.0 if self._completed or self._closing
                           else self.policy.next_wakeup(self._clock(), launch=launch))
                if timeout is None or timeout > 0:
                    self._cond.wait(timeout)
                if self._closing:
                    break
                completed, self._completed = self._completed, []
                outputs: list[Output] = []
                for step, result in completed:
                    if self.replay_lost_steps and isinstance(result, StageLostError):
                        self.policy.requeue_step(step.id, retry_at=self._clock() + LOST_STEP_RETRY_S)
                    else:
                        outputs += self.policy.complete(step.id, result)
                steps, cancelled = self.policy.schedule(self._clock(), launch=not self._suspended)
                outputs += cancelled
                pipeline = self.pipeline  # the one these steps are for: a step never reaches a later pipeline
            for step in steps:
                self._launch(pipeline, step)
            self._deliver(outputs)
        with self._cond:
            outputs = self.policy.close()
        self._deliver(outputs)

    def _launch(self, pipeline: Pipeline, step: Step) -> None:
        if not step.num_drafts:
            self._submit(pipeline, step, [])
            return
        methods = {m for m in step.draft_methods if m is not None}
        inline = [m for m in methods if self.proposers[m].runs_inline]
        drafts: list[Draft] = [Draft() for _ in step.sequence_ids]
        for method in inline:
            self._propose(step, method, drafts)
        later = [m for m in methods if m not in inline]
        if not later:
            self._submit(pipeline, step, drafts)
            return

        def draft_then_submit() -> None:  # on the draft model's thread
            for method in later:
                self._propose(step, method, drafts)
            self._submit(pipeline, step, drafts)

        assert self._draft_executor is not None, "a draft model needs its executor"
        self._draft_executor.submit(draft_then_submit)

    def _propose(self, step: Step, method: str, drafts: list[Draft]) -> None:
        """Fill ``drafts`` for the sequences of ``step`` that ``method`` drafts for; a proposer that fails is turned
        off with a warning (its sequences go on without drafts)."""
        rows = [b for b, m in enumerate(step.draft_methods) if m == method]
        requests = [DraftRequest(step.sequence_ids[b], step.contexts[b], step.num_drafts[b], step.sampling[b])
                    for b in rows]
        try:
            made = self.proposers[method].propose(requests)
        except Exception as e:
            log.warning("speculative decoding with %s failed (%s: %s): it is off from now on; requests go on "
                        "without it", method, type(e).__name__, e)
            with self._cond:
                self.policy.disable_drafts(method)
            return
        for b, draft in zip(rows, made):
            drafts[b] = Draft(draft.token_ids[: step.num_drafts[b]],
                              None if draft.probs is None else draft.probs[: step.num_drafts[b]])

    def _submit(self, pipeline: Pipeline, step: Step, drafts: list[Draft]) -> None:
        micro_batch = self._micro_batch(step, drafts)
        try:
            future = pipeline.submit(micro_batch)
        except Exception as e:  # the transport refused at once (e.g. a dead worker)
            self._complete(step, e)
            return
        future.add_done_callback(lambda f: self._complete(step, f.exception() or f.result()))

    def _micro_batch(self, step: Step, drafts: list[Draft]) -> MicroBatch:
        """The tensors of ``step``, each sequence's drafts fed after its tokens."""
        token_ids = list(step.token_ids)
        sampling = list(step.sampling)
        for b, draft in enumerate(drafts):
            if draft.token_ids:
                token_ids[b] = token_ids[b] + draft.token_ids
                sampling[b] = replace(sampling[b], drafts=draft.token_ids, draft_probs=draft.probs)
        lengths = [len(ids) for ids in token_ids]
        batch = StepBatch.build(list(step.starts), lengths, list(step.block_tables), self.allocator.block_size,
                                list(step.window_tables) or None)
        return MicroBatch(step.id, padded(token_ids), batch, sampling)

    def _complete(self, step: Step, result: list[int] | BaseException) -> None:
        with self._cond:
            self._completed.append((step, result))
            self._cond.notify()

    def _deliver(self, outputs: list[Output]) -> None:
        for sequence_id, event in outputs:
            emit = self._emitters.get(sequence_id)
            if event.finish_reason is not None:
                self._emitters.pop(sequence_id, None)
                for proposer in self.proposers.values():
                    proposer.release(sequence_id)
            if emit is not None:
                emit(event)
