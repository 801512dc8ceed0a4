"""The scheduling policy: admission, continuous batching, micro-batches, stopping. Plain data in and out.

No thread, no clock and no torch: the driver (:class:`~chatloop.engine.scheduler.Scheduler`)
passes the time in, launches the :class:`Step` s this returns, feeds their results back, and
delivers the events. So every rule here is tested with a fake pipeline and a fake clock.

- Requests wait in a bounded queue (``max_queue_size``; more raise :class:`QueueFullError`).
- A request is admitted when the running set has room (``max_batch_size``) and the block
  allocator can reserve its whole length (prompt + max_new_tokens), first come first served;
  admissions wait up to ``batching_window_s`` for company unless the batch would be full.
- Running sequences are cut into up to ``max_in_flight`` micro-batches so that every stage
  has work; a sequence has at most one step in flight; prompts and decodes go in separate
  micro-batches (a decode padded to a prompt's length wastes work).
- A prompt is prefilled in chunks of at most ``prefill_chunk_tokens``, and while prompts are
  being prefilled, prefill and decode micro-batches take turns: no step grows with the prompt
  (none runs past the RPC timeout) and running sequences keep decoding while a long one arrives.
- A sequence stops at an end-of-sequence token, a stop string, or ``max_new_tokens``;
  finished, failed and cancelled sequences give their blocks back at once.
- Where every layer attends within a sliding window (``kv_window``: Mistral, Phi-3...), a sequence reserves the
  blocks its window spans, not its whole length: a block whose positions have all fallen out of the window is used
  again for its next positions, and those it will not need any more go back to the pool after each step. Its block
  table keeps its length; the entries of blocks given up name one of its live blocks, which the window masks. With
  prefill chunks, a sequence may then be longer than the cache holds (up to ``max_context``).
- Where a model mixes windowed and full-attention layers (``window_allocator`` and ``mixed_window``: Gemma 2/3,
  Qwen2 below ``max_window_layers``), the windowed layers' keys and values live in a pool of their own: a sequence
  holds its full layers' blocks for its whole length (``allocator``) and a window table in the second pool
  (``window_allocator``) that slides as a windowed model's does (``Step.window_tables``). Admission needs room in
  both; speculation stays on (a step's window span covers its drafts). With the prefix cache, the window table's
  blocks are cached too (under the same hashes as the full layers'), and a block that falls out of the window goes
  back to the pool, still cached, instead of being used again: a hit then needs, besides the full layers' blocks,
  the windowed pool's blocks of the window before its end, held by no one (it takes them over: a window block is
  written again as it slides, so it is never shared); the hit is cut to the longest prefix that has them.
- Phi-3's longrope (``rope_switch``): the step that feeds a sequence's position ``rope_switch`` (the first
  rotated with the long factors) computes it again from its first token, in one step however
  ``prefill_chunk_tokens`` would cut it, as transformers' ``generate`` drops its cache there: the positions before
  were rotated with the short factors. A prompt (or a replay) longer than ``rope_switch`` is prefilled in one step
  for the same reason: transformers rotates all of it with the long factors.
- A request that scores its prompt sends, with each chunk, the prompt tokens that follow it, and
  collects their scores; a replay never scores a token twice.
- Prefix caching (``prefix_caching``): every full block a sequence has computed goes into the allocator's cache
  under the hash of its tokens and of every token before it (:func:`~chatloop.engine.blocks.block_hash`), and stays
  there after the sequence ends, until the pool needs the room (least recently used first). A sequence admitted
  later whose first full blocks hash the same holds those blocks too and is prefilled from the end of them: at least
  its last known token is computed, for the logits to sample from. Shared blocks are full and only read; a sequence
  writes only to blocks of its own. Under a sliding window on every layer, a block out of the window goes back to
  the pool, still cached, instead of being written again in place, and a hit needs only the blocks of the window
  before its end, held by no one (taken over, never shared: see :meth:`_window_hits`). With a ``rope_switch``,
  blocks of keys rotated with the long factors hash apart from the short factors' (``LONG_ROPE_ROOT``), and a
  sequence computed again at the switch does so into blocks of its own. Off for a request that scores its prompt
  (every prompt token must be computed). A lost pipeline takes every cached block with it (:meth:`requeue_all`).
- Speculative decoding (``speculative_method``, :mod:`~chatloop.engine.speculation`): a decoding sequence's step
  asks the driver for up to k drafted tokens after its last one (``Step.num_drafts``); its block table covers them.
  The answer (:class:`AcceptedTokens`) puts the accepted drafts and the last stage's own token into its output:
  only accepted positions count as cached, so the keys and values of rejected drafts lie past its length, are never
  offered to the prefix cache (only full blocks of known tokens are) and are overwritten by its next step. Its blocks
  were reserved for its whole length at admission, so nothing is taken or given back (under a window, on every
  layer or a mixed model's windowed ones, the blocks were reserved for a window and a step with its drafts, and
  slide past the accepted ones). k shrinks as more sequences speculate in one micro-batch (about k drafts a
  micro-batch in all), never drafts past ``max_new_tokens``, and stops short of a rope switch (the step that feeds
  its position computes the sequence again). A replay prefills the accepted tokens only.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

from .blocks import BlockAllocator, block_hash, window_span_blocks
from .detokenizer import Detokenizer
from .errors import (
    ContextLengthError,
    DeadlineExceededError,
    EmptyPromptError,
    QueueFullError,
    RequestError,
    SamplingError,
)
from .requests import (
    AcceptedTokens,
    FinishReason,
    SampledToken,
    SamplerInput,
    SamplingParams,
    ScoredToken,
    SequenceEvent,
)

__all__ = ["Output", "SchedulerPolicy", "SchedulerStats", "Step"]

LONG_ROPE_ROOT = b"longrope"
"""The hash chain's root for blocks whose keys are rotated with longrope's long factors (``_set_rope_factors``)."""


@dataclass(frozen=True)
class Step:
    """One micro-batch to launch: for each sequence, the new token ids, where they start, its blocks."""

    id: int
    sequence_ids: tuple[int, ...]
    token_ids: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    sampling: tuple[SamplerInput, ...]
    num_drafts: tuple[int, ...] = ()
    """Speculative decoding: the most tokens to draft after each sequence's tokens (0: none; empty: none at all)."""
    draft_methods: tuple[str | None, ...] = ()
    """Who drafts them, per sequence (``ngram``, ``draft``; None where none)."""
    contexts: tuple[tuple[int, ...], ...] = ()
    """Each sequence's known tokens where it drafts (empty where not), for the proposer."""
    window_tables: tuple[tuple[int, ...], ...] = ()
    """Mixed windows: each sequence's blocks in the windowed layers' pool (empty: one table for every layer)."""

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_ids)


Output = tuple[int, SequenceEvent]
"""An event for the consumer of sequence ``id``."""


@dataclass
class SchedulerStats:
    """Counters of the policy (read by metrics and status)."""

    num_waiting: int = 0
    num_running: int = 0
    num_in_flight: int = 0
    last_batch_size: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    replays: int = 0
    """Sequences prefilled again after their pipeline was lost."""
    prefix_queries: int = 0
    """Tokens looked up in the prefix cache: those known when a sequence was admitted (its prompt, and on a replay
    what it had generated), of the sequences that may use the cache."""
    prefix_hits: int = 0
    """Of those, tokens whose keys and values were found in the cache, and not computed again."""
    drafted_tokens: int = 0
    """Tokens drafted by speculative decoding and verified."""
    accepted_tokens: int = 0
    """Of those, tokens the model accepted."""


@dataclass(eq=False)
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    detokenizer: Detokenizer
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    """The blocks it holds: those of its logical blocks ``dropped``, ``dropped + 1``... in order."""
    dropped: int = 0  # its first logical blocks, out of the window (kv_window): given up, or used again
    window_blocks: list[int] = field(default_factory=list)
    """Mixed windows: the blocks of the windowed layers' pool it holds, its logical blocks ``window_dropped``..."""
    window_dropped: int = 0
    num_cached: int = 0  # tokens whose keys and values are in the cache
    in_flight: bool = False
    cancelled: bool = False
    deadline: float | None = None
    expired: bool = False  # past its deadline: ends with an error as soon as no step of it is out
    replays: int = 0  # times its tokens went into fresh KV blocks again (a lost worker was replaced)
    whole: bool = False  # computed again from its first token in one step, unchunked (rope_switch)
    prompt_scores: list[ScoredToken] = field(default_factory=list)  # of prompt tokens 1, 2, ... (prompt_logprobs)
    prompt_scores_sent: bool = False
    hashes: list[bytes] = field(default_factory=list)  # content hashes of its first full blocks of known tokens
    long_rope: bool = False  # (longrope) its keys are, or will be, rotated with the long factors: hashed apart
    num_offered: int = 0  # its first blocks offered to the prefix cache (computed and full)
    window_offered: int = 0  # (mixed windows) its logical blocks before this one offered from the window table
    hit_tokens: int = 0  # tokens found in the prefix cache at its last admission
    draft_method: str | None = None  # who drafts for it (speculative decoding), or None
    num_draft_tokens: int = 0  # the most tokens drafted at one of its steps (k)
    drafted: int = 0
    accepted: int = 0

    @property
    def total_tokens(self) -> int:
        """The most tokens it can hold: what its blocks are reserved for."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def num_known(self) -> int:
        """Tokens whose ids are known: the prompt and what was generated so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        """More than one known token still has to go into the cache (a prompt, or a replay)."""
        return self.num_known - self.num_cached > 1

    def next_tokens(self, chunk: int | None) -> list[int]:
        """The token ids to feed at its next step: the known tokens not yet cached, at most ``chunk`` of them."""
        end = self.num_known if chunk is None else min(self.num_known, self.num_cached + chunk)
        if self.num_cached < len(self.prompt_ids):
            return (self.prompt_ids + self.output_ids)[self.num_cached : end]
        return self.output_ids[self.num_cached - len(self.prompt_ids) : end - len(self.prompt_ids)]

    def targets(self, num_fed: int) -> tuple[int, tuple[int, ...]]:
        """The prompt tokens to score at a step that feeds ``num_fed`` tokens: (offset in the step, token ids).

        Position p predicts prompt token p + 1; tokens already scored (before a replay) are not asked again."""
        if not self.params.prompt_logprobs:
            return 0, ()
        first = max(self.num_cached + 1, len(self.prompt_scores) + 1)  # the first prompt index not yet scored
        last = min(self.num_cached + num_fed, len(self.prompt_ids) - 1)
        if first > last:
            return 0, ()
        return first - 1 - self.num_cached, tuple(self.prompt_ids[first : last + 1])


class SchedulerPolicy:
    """Every sequence's state and the rules above; the caller serialises calls (one lock)."""

    def __init__(
        self,
        allocator: BlockAllocator,
        tokenizer,
        *,
        max_batch_size: int = 16,
        batching_window_s: float = 0.005,
        max_queue_size: int = 256,
        max_in_flight: int = 1,
        max_context: int | None = None,
        max_tokens_per_micro_batch: int = 4096,
        prefill_chunk_tokens: int | None = None,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
        kv_window: int | None = None,
        rope_switch: int | None = None,
        prefix_caching: bool = True,
        speculative_method: str | None = None,
        num_speculative_tokens: int = 4,
        draft_methods: frozenset[str] = frozenset({"ngram"}),
        window_allocator: BlockAllocator | None = None,
        mixed_window: int | None = None,
    ) -> None:
        if (window_allocator is None) != (mixed_window is None):
            raise ValueError("window_allocator and mixed_window go together: the windowed layers' pool and window")
        if window_allocator is not None and window_allocator.block_size != allocator.block_size:
            raise ValueError(f"the windowed layers' blocks ({window_allocator.block_size} tokens) must be the "
                             f"size of the full layers' ({allocator.block_size})")
        self.allocator = allocator
        self.window_allocator = window_allocator
        """Mixed windows: the blocks of the windowed layers' own pool; None: one pool (one table) for every layer."""
        self.mixed_window = mixed_window
        """The window of the windowed layers that ``window_allocator``'s blocks serve, or None."""
        self.kv_window = kv_window
        """The sliding window every layer attends within (:attr:`~chatloop.models.ModelArgs.kv_window`), or None."""
        self.rope_switch = rope_switch
        """Where longrope's long factors take over (:attr:`~chatloop.models.ModelArgs.rope_switch`), or None."""
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batching_window_s = batching_window_s
        self.max_queue_size = max_queue_size
        self.max_in_flight = max_in_flight
        self.max_context = max_context
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefix_caching = prefix_caching
        """Whether full blocks are cached and shared (asked for)."""
        self.speculative_method = speculative_method
        """Who drafts for requests that do not choose (``ngram``, ``draft``), or None: no speculative decoding."""
        self.num_speculative_tokens = num_speculative_tokens
        """k: the most tokens drafted for one sequence at one step."""
        self.loaded_methods = frozenset(draft_methods)
        """The methods a request may ask for (``draft`` where a draft model was loaded)."""
        self.draft_methods = set(draft_methods)
        """The methods that draft now (a draft model that failed is taken out)."""
        self.stats = SchedulerStats()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self._steps: dict[int, tuple[list[_Sequence], list[int]]] = {}  # in flight: sequences, tokens fed
        self._ids = itertools.count()
        self._last_cut_prefill = False
        self._retry_at = 0.0  # after a lost step, nothing is launched before this
        self.paused_reason = ""
        """Why no step is launched now (the driver says, while a lost worker is replaced); used in messages."""

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + generated) one sequence may have: the model's context or the KV cache."""
        if self.max_context and self._most_blocks(self.max_context) <= self.allocator.num_blocks \
                and self._most_window_blocks(self.max_context) <= self._window_pool_blocks:
            return self.max_context  # (under a window with prefill chunks, more than the cache's capacity)
        limits = [self.allocator.capacity_tokens] + ([self.max_context] if self.max_context else [])
        if self.window_allocator is not None and self._most_window_blocks(min(limits)) > self._window_pool_blocks:
            limits.append(self.window_allocator.capacity_tokens)
        return min(limits)

    @property
    def _window_pool_blocks(self) -> int:
        return self.window_allocator.num_blocks if self.window_allocator is not None else 0

    def _most_window_blocks(self, num_tokens: int, num_drafts: int | None = None) -> int:
        """Mixed windows: the most blocks of the windowed layers' pool a sequence of ``num_tokens`` holds at once
        (what its window and its largest step span: a prefill chunk, or a token and its drafts); 0 without."""
        if self.mixed_window is None:
            return 0
        if num_drafts is None:
            num_drafts = self.num_speculative_tokens if self.speculative_method not in (None, "off") else 0
        k = num_drafts
        step = max(min(self.prefill_chunk_tokens or num_tokens, num_tokens), 1 + k)
        if self.rope_switch is not None and num_tokens > self.rope_switch:
            step = num_tokens
        return min(self.allocator.blocks_for(num_tokens),
                   window_span_blocks(self.mixed_window, step, self.allocator.block_size))

    def _most_blocks(self, num_tokens: int, num_drafts: int | None = None) -> int:
        """The most blocks a sequence of ``num_tokens`` tokens holds at once (see :meth:`_blocks_needed`): all of
        its length's, or under a window, those of a window and its largest step (a prefill chunk, a token and its
        ``num_drafts`` drafts (default: the configured k where speculation is on), or a whole replay)."""
        whole = self.allocator.blocks_for(num_tokens)
        if self.kv_window is None:
            return whole
        if num_drafts is None:
            num_drafts = self.num_speculative_tokens if self.speculative_method not in (None, "off") else 0
        step = max(min(self.prefill_chunk_tokens or num_tokens, num_tokens), 1 + num_drafts)
        if self.rope_switch is not None and num_tokens > self.rope_switch:  # a whole step past it (see _chunk)
            step = num_tokens
        return min(whole, window_span_blocks(self.kv_window, step, self.allocator.block_size))

    # ---- requests ------------------------------------------------------------------------------
    def add(self, prompt_ids: list[int], params: SamplingParams, now: float) -> int:
        """Queue a request; return its sequence id. Raises a typed error for a request that cannot run."""
        if not prompt_ids:
            raise EmptyPromptError("the prompt is empty: send at least one token", param="prompt")
        total = len(prompt_ids) + params.max_new_tokens
        if self.max_context is not None and total > self.max_context:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds "
                f"the model's context of {self.max_context} tokens: shorten the prompt or lower max_new_tokens",
                param="max_tokens",
            )
        method = params.speculative_method or self.speculative_method
        k = self.num_speculative_tokens if params.speculative_tokens is None else params.speculative_tokens
        if self._most_blocks(total, k if method not in (None, "off") else 0) > self.allocator.num_blocks:
            chunks = " or set batching.prefill_chunk_tokens" if self.kv_window and not self.prefill_chunk_tokens else ""
            raise ContextLengthError(
                f"prompt + max_new_tokens = {total} tokens exceeds the KV cache's {self.allocator.capacity_tokens} "
                f"tokens: lower max_new_tokens or raise cache.kv_cache_mb{chunks}",
                param="max_tokens",
            )
        if self._most_window_blocks(total, k if method not in (None, "off") else 0) > self._window_pool_blocks:
            raise ContextLengthError(
                f"prompt + max_new_tokens = {total} tokens spans more than the windowed layers' pool of "
                f"{self._window_pool_blocks} blocks: lower max_new_tokens, batching.prefill_chunk_tokens or "
                "speculative_tokens, or raise cache.kv_cache_mb",
                param="max_tokens",
            )
        if params.speculative_method == "draft" and "draft" not in self.loaded_methods:
            raise RequestError("speculative_method='draft' needs a draft model: the server runs without one (set "
                               "speculative.method=draft and speculative.draft_model), or ask for 'ngram'",
                               param="speculative_method")
        if len(self._waiting) >= self.max_queue_size:
            raise QueueFullError(f"the request queue is full ({self.max_queue_size} waiting): retry later")
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        seq = _Sequence(next(self._ids), list(prompt_ids), params, seed, Detokenizer(self.tokenizer, params.stop), now)
        self._set_rope_factors(seq, self.rope_switch is not None and len(prompt_ids) > self.rope_switch)
        if params.timeout_s is not None:
            seq.deadline = now + params.timeout_s
        if method not in (None, "off") and k > 0:
            seq.draft_method, seq.num_draft_tokens = method, k
        self._waiting.append(seq)
        self._by_id[seq.id] = seq
        self.stats.num_waiting = len(self._waiting)
        return seq.id

    def cancel(self, sequence_id: int) -> None:
        """Cancel a sequence: it ends with ``CANCELLED`` at the next :meth:`schedule` (or when its step returns)."""
        seq = self._by_id.get(sequence_id)
        if seq is not None:
            seq.cancelled = True

    # ---- scheduling --------------------------------------------------------------------------
    def schedule(self, now: float, launch: bool = True) -> tuple[list[Step], list[Output]]:
        """End cancelled and expired sequences, admit waiting ones, and cut the micro-batches to launch now.

        ``launch=False`` (the pipeline is being rebuilt): end what must end, admit and cut nothing.
        """
        for seq in [*self._waiting, *self._running]:
            if seq.deadline is not None and now >= seq.deadline and not seq.expired:
                seq.expired = seq.cancelled = True
        outputs: list[Output] = []
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            outputs.append(self._end_cancelled(seq))
        for seq in [s for s in self._running if s.cancelled and not s.in_flight]:
            outputs.append(self._end_cancelled(seq))
        steps = []
        if launch and now >= self._retry_at:
            self._admit(now)
            steps = self._cut()
        self.stats.num_waiting, self.stats.num_running = len(self._waiting), len(self._running)
        return steps, outputs

    def next_wakeup(self, now: float, launch: bool = True) -> float | None:
        """Seconds until :meth:`schedule` may have something to do (0: now; None: not until something happens)."""
        # A cancelled sequence still in flight is finished when its step returns: no busy wait.
        if any(s.cancelled for s in self._waiting) or any(s.cancelled and not s.in_flight for s in self._running):
            return 0.0
        deadlines = [s.deadline - now for s in [*self._waiting, *self._running] if s.deadline is not None and not
                     s.expired]
        wakeups = [max(0.0, min(deadlines))] if deadlines else []
        if launch and now < self._retry_at:
            return min([*wakeups, self._retry_at - now])
        if launch and self._can_launch():
            return 0.0
        if launch and self._waiting and len(self._running) < self.max_batch_size and self._has_blocks_for(
                self._waiting[0]):
            wakeups.append(max(0.0, self.batching_window_s - (now - self._waiting[0].arrival)))
        return min(wakeups) if wakeups else None

    def _end_cancelled(self, seq: _Sequence) -> Output:
        if not seq.expired:
            return self._finish(seq, FinishReason.CANCELLED)
        waited = f" (the cluster was recovering: {self.paused_reason})" if self.paused_reason else ""
        error = DeadlineExceededError(
            f"the request did not finish within its timeout of {seq.params.timeout_s:g} s{waited}: retry, or allow "
            "more time"
        )
        return self._finish(seq, FinishReason.ERROR, error=error)

    def _has_blocks_for(self, seq: _Sequence) -> bool:
        _, hits = self._hits(seq)
        if self.window_allocator is not None and self._window_needed(seq) > self.window_allocator.num_free:
            return False
        return self._blocks_needed(seq) - len(hits) + self.allocator.num_unheld(hits) <= self.allocator.num_free

    # ---- the prefix cache ----------------------------------------------------------------------
    def _hashes(self, seq: _Sequence, num_blocks: int) -> list[bytes]:
        """The content hashes of ``seq``'s first ``num_blocks`` blocks (full, of known tokens), computed once."""
        size = self.allocator.block_size
        if len(seq.hashes) < num_blocks:
            known = seq.prompt_ids + seq.output_ids
            for i in range(len(seq.hashes), num_blocks):
                parent = seq.hashes[-1] if seq.hashes else (LONG_ROPE_ROOT if seq.long_rope else None)
                seq.hashes.append(block_hash(parent, known[i * size : (i + 1) * size]))
        return seq.hashes[:num_blocks]

    def _set_rope_factors(self, seq: _Sequence, long: bool) -> None:
        """(longrope) Whether ``seq``'s keys are rotated with the long factors from its next computation on: a
        prompt or replay past ``rope_switch`` is, a sequence computed again at the switch is (:meth:`_switch_rope`).
        Its blocks hash apart from the short factors' (the same tokens, other keys)."""
        if seq.long_rope != long:
            seq.long_rope, seq.hashes = long, []

    def _hits(self, seq: _Sequence) -> tuple[int, list[int]]:
        """Where ``seq`` may start from the cache: (how many of its first full blocks it skips, the cached blocks of
        ``allocator`` it takes for them), leaving at least its last known token to compute; (0, []) for a request
        that scores its prompt. Without a window on every layer, those blocks are all of them; under one, only
        those of the window before their end (:meth:`_window_hits`). With mixed windows, no further than the
        windowed pool has that window."""
        if not self.prefix_caching or seq.params.prompt_logprobs:
            return 0, []
        most = (seq.num_known - 1) // self.allocator.block_size
        if self.kv_window is not None:
            return self._window_hits(seq, most, self.allocator, self.kv_window)
        hits = self.allocator.lookup(self._hashes(seq, most))
        if self.mixed_window is not None and hits:
            hits = hits[: self._window_hits(seq, len(hits), self.window_allocator, self.mixed_window)[0]]
        return len(hits), hits

    def _window_first(self, num_cached: int, window: int) -> int:
        """The first logical block a step from position ``num_cached`` reads under ``window``."""
        return max(0, num_cached - window + 1) // self.allocator.block_size

    def _window_hits(self, seq: _Sequence, num_hits: int, pool: BlockAllocator, window: int) -> tuple[int, list[int]]:
        """Under a window: the most of ``seq``'s first ``num_hits`` full blocks it can skip, those whose window
        before their end (its logical blocks from :meth:`_window_first` on) ``pool`` has cached and held by no one,
        and those blocks: (how many it skips, the blocks); (0, []) where none. Windowed blocks are taken over,
        never shared: the window gives them back as it slides, and only a block of its own makes room then."""
        hashes = self._hashes(seq, num_hits)
        found = [pool.lookup([h]) for h in hashes]
        run = 0  # cached, unheld blocks in a row ending at block n - 1
        best = 0
        for n in range(1, num_hits + 1):
            run = run + 1 if found[n - 1] and pool.num_unheld(found[n - 1]) else 0
            if run >= n - self._window_first(n * pool.block_size, window):
                best = n
        if not best:
            return 0, []
        return best, [found[j][0] for j in range(self._window_first(best * pool.block_size, window), best)]

    def _offer(self, seq: _Sequence) -> None:
        """Put ``seq``'s full blocks computed so far into the prefix cache (where no block holds their content yet)."""
        if not self.prefix_caching:
            return
        full = min(seq.num_cached // self.allocator.block_size, seq.dropped + len(seq.blocks))
        if full <= seq.num_offered:
            return
        hashes = self._hashes(seq, full)
        for j in range(max(seq.num_offered, seq.dropped), full):  # (logical block j; under a window, from dropped)
            self.allocator.cache(seq.blocks[j - seq.dropped], hashes[j])
        seq.num_offered = full
        if seq.window_blocks:  # (mixed windows) the window table's computed full blocks, under the same hashes
            for j in range(max(seq.window_offered, seq.window_dropped),
                           min(full, seq.window_dropped + len(seq.window_blocks))):
                self.window_allocator.cache(seq.window_blocks[j - seq.window_dropped], hashes[j])
            seq.window_offered = max(seq.window_offered, full)

    def _blocks_needed(self, seq: _Sequence) -> int:
        """The most blocks ``seq`` holds at once from now on: all of its length's, or under a window, what the
        window of its largest step to come spans (:func:`~chatloop.engine.blocks.window_span_blocks`)."""
        whole = self.allocator.blocks_for(seq.total_tokens) - seq.dropped
        if self.kv_window is None:
            return whole
        uncached = seq.num_known - seq.num_cached
        step = 1 + (seq.num_draft_tokens if seq.draft_method else 0)  # (its decode steps: a token and its drafts)
        if seq.prefilling:
            step = max(step, min(self._chunk(seq) or uncached, uncached))
        return min(whole, window_span_blocks(self.kv_window, step, self.allocator.block_size))

    def _window_needed(self, seq: _Sequence) -> int:
        """Mixed windows: the most blocks of the windowed layers' pool ``seq`` holds at once from now on: what the
        window of its largest step to come spans (as :meth:`_blocks_needed` under ``kv_window``; a decode step's
        tokens are its last one and its drafts)."""
        whole = self.allocator.blocks_for(seq.total_tokens) - seq.window_dropped
        uncached = seq.num_known - seq.num_cached
        step = 1 + (seq.num_draft_tokens if seq.draft_method else 0)  # (its decode steps: what it is reserved for)
        if seq.prefilling:
            step = max(step, min(self._chunk(seq) or uncached, uncached))
        return min(whole, window_span_blocks(self.mixed_window, step, self.allocator.block_size))

    def _slide_window(self, seq: _Sequence) -> None:
        """Mixed windows: the window table slides as :meth:`_slide` slides a windowed model's blocks (the blocks
        out of the window move to its back; those it will not need any more go back to the windowed pool)."""
        if self.mixed_window is None or not seq.window_blocks:
            return
        if not self.prefix_caching:
            seq.window_blocks, seq.window_dropped = self._slid(seq.window_blocks, seq.window_dropped,
                                                               self.mixed_window, seq.num_cached)
        else:
            seq.window_dropped = self._let_go(seq.window_blocks, seq.window_dropped, self.mixed_window,
                                              seq.num_cached, self._window_needed(seq), self.window_allocator)
        self._give_back(seq.window_blocks, self._window_needed(seq), self.window_allocator)

    def _let_go(self, blocks: list[int], dropped: int, window: int, num_cached: int, needed: int,
                allocator: BlockAllocator) -> int:
        """With the prefix cache, the blocks of ``blocks`` (logical blocks ``dropped``... of ``allocator``) out of
        ``window`` go back, still cached (a later prefix may need them), instead of being written again in place;
        fresh ones follow, up to ``needed``. Returns the new ``dropped``."""
        first = self._window_first(num_cached, window)
        out = first - dropped
        if out > 0:
            allocator.free(blocks[:out])
            del blocks[:out]
            dropped = first
        if needed > len(blocks):  # (every block it holds is its own: those it let go made the room)
            taken = allocator.take(needed - len(blocks))
            assert taken is not None, "the pool gave back fewer blocks than the window took"
            blocks += taken
        return dropped

    def _free_window(self, seq: _Sequence) -> None:
        """Give back every block of the windowed layers' pool ``seq`` holds."""
        if seq.window_blocks:
            self.window_allocator.free(seq.window_blocks)
        seq.window_blocks, seq.window_dropped, seq.window_offered = [], 0, 0

    def _chunk(self, seq: _Sequence) -> int | None:
        """The most tokens ``seq`` feeds at its next step (None: all it has not cached): all of them where it is
        computed again from its first token (:meth:`_switch_rope`), or where its first step would run past
        ``rope_switch`` (a prompt or a replay that long is rotated with the long factors at every position, as
        transformers computes it in one call: chunks before the switch would keep the short ones)."""
        if seq.whole or (self.rope_switch is not None and seq.num_cached <= self.rope_switch < seq.num_known):
            return None  # (after a prefix hit too: the rest of a long prompt in one step, past the switch)
        return self.prefill_chunk_tokens

    def _switch_rope(self, seq: _Sequence) -> None:
        """At the step that feeds position ``rope_switch``, ``seq`` is computed again from its first token, every
        position rotated with the long factors, in one step (transformers' Phi3ForCausalLM drops its cache there)."""
        if self.rope_switch is None or seq.num_cached != self.rope_switch or seq.num_known != self.rope_switch + 1:
            return
        seq.num_cached, seq.whole = 0, True
        self._set_rope_factors(seq, True)
        seq.num_offered = 0
        # A window shorter than rope_switch gave its first blocks up, and the prefix cache may hold (and share) its
        # blocks with the short factors' keys: all are written again, into blocks of its own.
        if seq.dropped or self.prefix_caching:
            self.allocator.free(seq.blocks)
            seq.blocks, seq.dropped = [], 0
            blocks = self.allocator.take(self._blocks_needed(seq))
            if blocks is None:
                self._requeue([seq])  # it waits at the front of the queue for the blocks
                return
            seq.blocks = blocks
        if seq.window_blocks:  # (mixed windows) the window table too: its whole step from the first token
            self._free_window(seq)
            blocks = self.window_allocator.take(self._window_needed(seq))
            if blocks is None:
                self._requeue([seq])
            else:
                seq.window_blocks = blocks

    def _slide(self, seq: _Sequence) -> None:
        """Under a window: the blocks that fell out of it move to the back of ``seq.blocks`` (its next logical
        blocks), and those beyond what it needs from now on go back to the pool."""
        if self.kv_window is None or not seq.blocks:
            return
        if not self.prefix_caching:
            seq.blocks, seq.dropped = self._slid(seq.blocks, seq.dropped, self.kv_window, seq.num_cached)
        else:
            seq.dropped = self._let_go(seq.blocks, seq.dropped, self.kv_window, seq.num_cached,
                                       self._blocks_needed(seq), self.allocator)
        self._give_back(seq.blocks, self._blocks_needed(seq), self.allocator)

    def _slid(self, blocks: list[int], dropped: int, window: int, num_cached: int) -> tuple[list[int], int]:
        """``blocks`` (a sequence's logical blocks ``dropped``, ``dropped + 1``... in one pool) and ``dropped`` once
        its next step starts at ``num_cached``: the blocks out of ``window`` moved to the back (its next ones)."""
        first = self._window_first(num_cached, window)  # its next step's first
        out = first - dropped
        return (blocks[out:] + blocks[:out], first) if out > 0 else (blocks, dropped)

    @staticmethod
    def _give_back(blocks: list[int], needed: int, allocator: BlockAllocator) -> None:
        """The blocks at the end of ``blocks`` beyond the ``needed`` first go back to ``allocator``."""
        spare = len(blocks) - needed
        if spare > 0:
            allocator.free(blocks[-spare:])
            del blocks[-spare:]

    def _admit(self, now: float) -> None:
        if not self._waiting:
            return
        room = self.max_batch_size - len(self._running)
        # Wait for company for up to the batching window, unless the batch is full already.
        if len(self._waiting) < room and now - self._waiting[0].arrival < self.batching_window_s:
            return
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            if not self._has_blocks_for(seq):
                break  # first come, first served: later requests do not overtake
            skipped, hits = self._hits(seq)
            self.allocator.share(hits)  # (first: taking the rest must not evict them)
            seq.num_cached = seq.hit_tokens = skipped * self.allocator.block_size
            seq.num_offered = skipped
            seq.dropped = skipped - len(hits)  # (under a window: the blocks before its window's are not held)
            blocks = self.allocator.take(self._blocks_needed(seq) - len(hits))
            assert blocks is not None
            self._waiting.popleft()
            seq.blocks = hits + blocks
            if self.window_allocator is not None:  # (its window's cached blocks taken over, see _window_hits)
                window_hits = self._window_hits(seq, skipped, self.window_allocator, self.mixed_window)[1] \
                    if skipped else []
                self.window_allocator.share(window_hits)
                seq.window_dropped = self._window_first(seq.num_cached, self.mixed_window)
                seq.window_offered = skipped
                fresh = self.window_allocator.take(self._window_needed(seq) - len(window_hits))
                assert fresh is not None
                seq.window_blocks = window_hits + fresh
            if self.prefix_caching and not seq.params.prompt_logprobs:
                self.stats.prefix_queries += seq.num_known
                self.stats.prefix_hits += seq.hit_tokens
            self._running.append(seq)

    def _ready(self) -> list[_Sequence]:
        return [s for s in self._running if not s.in_flight and not s.cancelled]

    def _can_launch(self) -> bool:
        return self.stats.num_in_flight < self.max_in_flight and any(
            not s.in_flight and not s.cancelled for s in self._running
        )

    def _cut(self) -> list[Step]:
        for seq in self._ready():
            self._switch_rope(seq)
        steps = []
        while self.stats.num_in_flight < self.max_in_flight:
            ready = self._ready()
            if not ready:
                break
            prefill = [s for s in ready if s.prefilling]
            decode = [s for s in ready if not s.prefilling]
            # Both waiting: take turns, so that decodes go on while a long prompt is prefilled in chunks.
            group = decode if decode and (not prefill or self._last_cut_prefill) else prefill
            self._last_cut_prefill = group is prefill
            cap = max(1, math.ceil(len(self._running) / self.max_in_flight))
            chosen: list[_Sequence] = []
            longest = 0
            for seq in group[:cap]:
                longest = max(longest, len(seq.next_tokens(self._chunk(seq))))
                if chosen and longest * (len(chosen) + 1) > self.max_tokens_per_micro_batch:
                    break
                chosen.append(seq)
            steps.append(self._step(chosen))
        return steps

    def _step(self, seqs: list[_Sequence]) -> Step:
        tokens = [s.next_tokens(self._chunk(s)) for s in seqs]
        drafts = self._num_drafts(seqs)
        tables = [  # (under a window, the blocks given up are named by a live one: out of the window, masked)
            (s.blocks[0],) * s.dropped
            + tuple(s.blocks[: self.allocator.blocks_for(s.num_cached + len(t) + k) - s.dropped])
            for s, t, k in zip(seqs, tokens, drafts)
        ]
        window_tables = ()
        if self.window_allocator is not None:  # (the entries before the window name a live block, masked)
            window_tables = tuple(
                (s.window_blocks[0],) * s.window_dropped
                + tuple(s.window_blocks[: self.allocator.blocks_for(s.num_cached + len(t) + k) - s.window_dropped])
                for s, t, k in zip(seqs, tokens, drafts)
            )
            assert all(len(w) == len(f) for w, f in zip(window_tables, tables)), "a window table is short"
        sampling = tuple(self._sampler_input(s, len(t)) for s, t in zip(seqs, tokens))
        speculating = any(drafts)
        step = Step(
            next(self._ids), tuple(s.id for s in seqs), tuple(tuple(t) for t in tokens),
            tuple(s.num_cached for s in seqs), tuple(tables), sampling,
            num_drafts=tuple(drafts) if speculating else (),
            draft_methods=tuple(s.draft_method if k else None for s, k in zip(seqs, drafts)) if speculating else (),
            contexts=tuple(tuple(s.prompt_ids + s.output_ids) if k else () for s, k in zip(seqs, drafts))
            if speculating else (),
            window_tables=window_tables,
        )
        for s in seqs:
            s.in_flight = True
        self._steps[step.id] = (seqs, [len(t) for t in tokens])
        self.stats.num_in_flight += 1
        self.stats.last_batch_size = len(seqs)
        return step

    def _num_drafts(self, seqs: list[_Sequence]) -> list[int]:
        """How many tokens to draft for each sequence of a micro-batch: its k where it speculates alone, and about
        k in all where several do (a wider verification step costs every stage more); none past max_new_tokens, and
        with a rope switch none at or past it while the sequence is before it: the step that feeds the switch's
        position must be a token's own (it computes the sequence again, see :meth:`_switch_rope`), and a verify step
        before it must stay on the short factors."""
        wanted = [s.draft_method in self.draft_methods and not s.prefilling for s in seqs]
        num_speculating = sum(wanted)
        drafts = []
        for seq, want in zip(seqs, wanted):
            k = seq.num_draft_tokens // num_speculating if want else 0
            if self.rope_switch is not None and seq.num_cached < self.rope_switch:
                k = min(k, self.rope_switch - 1 - seq.num_cached)
            drafts.append(max(0, min(k, seq.params.max_new_tokens - len(seq.output_ids) - 1)))
        return drafts

    def disable_drafts(self, method: str) -> None:
        """``method`` cannot draft any more (its draft model failed): its sequences go on without speculation."""
        self.draft_methods.discard(method)

    @staticmethod
    def _sampler_input(seq: _Sequence, num_fed: int) -> SamplerInput:
        p = seq.params
        score_from, targets = seq.targets(num_fed)
        return SamplerInput(
            p.temperature, p.top_k, p.top_p, p.repetition_penalty, seq.seed, len(seq.output_ids),
            tuple(seq.prompt_ids + seq.output_ids) if p.repetition_penalty != 1.0 else (),
            logprobs=p.logprobs, targets=targets, score_from=score_from,
        )

    # ---- results -----------------------------------------------------------------------------
    def complete(self, step_id: int, result: list[int | str] | BaseException) -> list[Output]:
        """A step's sampled token ids (one per sequence; an error message for one that could not be sampled),
        or the error that failed the whole step."""
        if step_id not in self._steps:  # a step of a pipeline that was lost: its sequences were requeued
            return []
        seqs, fed = self._steps.pop(step_id)
        self.stats.num_in_flight -= 1
        outputs: list[Output] = []
        for b, seq in enumerate(seqs):
            seq.in_flight = False
            if isinstance(result, BaseException):
                outputs.append(self._finish(seq, FinishReason.ERROR, error=result))
                continue
            answer = result[b]
            if isinstance(answer, SampledToken):
                seq.prompt_scores.extend(answer.prompt)
            seq.num_cached += fed[b]
            seq.whole = False
            self._offer(seq)
            self._slide(seq)
            self._slide_window(seq)
            if seq.cancelled:
                outputs.append(self._end_cancelled(seq))
                continue
            if seq.num_cached < seq.num_known:
                continue  # a chunk of its prompt: the token sampled after it is not the next one yet
            if isinstance(answer, str):  # this sequence alone could not be sampled
                outputs.append(self._finish(seq, FinishReason.ERROR, error=SamplingError(answer)))
                continue
            if seq.params.max_new_tokens == 0:  # the prompt scored, nothing to generate
                outputs.append(self._finish(seq, FinishReason.LENGTH))
                continue
            if isinstance(answer, AcceptedTokens):
                # The accepted drafts' keys and values are cached too (and offered once they are known tokens).
                seq.num_cached += answer.num_accepted
                seq.drafted += answer.num_drafted
                seq.accepted += answer.num_accepted
                self.stats.drafted_tokens += answer.num_drafted
                self.stats.accepted_tokens += answer.num_accepted
                outputs.append(self._accept_all(seq, answer))
                self._offer(seq)
                self._slide(seq)  # (past the accepted drafts: the next step's window starts after them)
                self._slide_window(seq)
            elif isinstance(answer, SampledToken):
                outputs.append(self._accept(seq, answer.token_id, answer.scored))
            else:
                outputs.append(self._accept(seq, int(answer)))
        self.stats.num_running = len(self._running)
        return outputs

    def _accept_all(self, seq: _Sequence, answer: AcceptedTokens) -> Output:
        """Several tokens of one verification step, in order, as one event (up to the one that ends it)."""
        texts: list[str] = []
        tokens: list[int] = []
        scores: list[ScoredToken] = []
        prompt_scores = None
        for i, token in enumerate(answer.token_ids):
            scored = answer.scored[i] if answer.scored else None
            _, event = self._accept(seq, token, scored)
            texts.append(event.text)
            tokens += event.token_ids
            scores += event.logprobs
            prompt_scores = event.prompt_logprobs if prompt_scores is None else prompt_scores
            if event.finish_reason is not None:
                return seq.id, replace(event, text="".join(texts), token_ids=tuple(tokens), logprobs=tuple(scores),
                                       prompt_logprobs=prompt_scores)
        return seq.id, SequenceEvent("".join(texts), tuple(tokens), logprobs=tuple(scores),
                                     prompt_logprobs=prompt_scores)

    def _accept(self, seq: _Sequence, token: int, scored: ScoredToken | None = None) -> Output:
        self.stats.generated_tokens += 1
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return self._finish(seq, FinishReason.STOP)
        seq.output_ids.append(token)
        text, stopped = seq.detokenizer.add(token)
        if stopped:
            return self._finish(seq, FinishReason.STOP, text=text)
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            return self._finish(seq, FinishReason.LENGTH, text=text, token=token, scored=scored)
        return seq.id, SequenceEvent(text, (token,), logprobs=(scored,) if scored else (),
                                     prompt_logprobs=self._prompt_scores(seq))

    @staticmethod
    def _prompt_scores(seq: _Sequence) -> tuple[ScoredToken, ...] | None:
        """The prompt's scores, on the first event of a sequence that asked for them."""
        if not seq.params.prompt_logprobs or seq.prompt_scores_sent:
            return None
        seq.prompt_scores_sent = True
        return tuple(seq.prompt_scores)

    def _finish(
        self, seq: _Sequence, reason: FinishReason, *, text: str = "", token: int | None = None,
        scored: ScoredToken | None = None, error: BaseException | None = None,
    ) -> Output:
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        self._free_window(seq)
        if seq in self._running:
            self._running.remove(seq)
        self._by_id.pop(seq.id, None)
        self.stats.finished[reason.value] = self.stats.finished.get(reason.value, 0) + 1
        prompt_scores = None
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            text += seq.detokenizer.flush()
            prompt_scores = self._prompt_scores(seq)
        speculated = seq.draft_method is not None
        return seq.id, SequenceEvent(text, () if token is None else (token,), finish_reason=reason, error=error,
                                     logprobs=(scored,) if scored else (), prompt_logprobs=prompt_scores,
                                     cached_tokens=min(seq.hit_tokens, len(seq.prompt_ids)),
                                     drafted_tokens=seq.drafted if speculated else None,
                                     accepted_tokens=seq.accepted if speculated else None)

    # ---- a lost pipeline ----------------------------------------------------------------------
    def requeue_step(self, step_id: int, retry_at: float) -> int:
        """One step was lost on its way (not failed by a stage): its sequences go back to the front of the queue,
        to be prefilled again, no sooner than ``retry_at`` (the pipeline is probably being rebuilt)."""
        if step_id not in self._steps:
            return 0
        seqs, _ = self._steps.pop(step_id)
        self.stats.num_in_flight -= 1
        for seq in seqs:
            seq.in_flight = False
        self._requeue([s for s in seqs if s in self._running])
        self._retry_at = max(self._retry_at, retry_at)
        return len(seqs)

    def _requeue(self, seqs: list[_Sequence]) -> None:
        for seq in seqs:
            if seq.blocks:
                self.allocator.free(seq.blocks)
                seq.blocks = []
            self._free_window(seq)
            seq.num_cached = seq.dropped = seq.num_offered = seq.hit_tokens = 0
            self._set_rope_factors(seq, self.rope_switch is not None and seq.num_known > self.rope_switch)
            seq.in_flight = False
            seq.replays += 1
            self._running.remove(seq)
        self._waiting.extendleft(reversed(seqs))
        self.stats.replays += len(seqs)
        self.stats.num_waiting, self.stats.num_running = len(self._waiting), len(self._running)

    def requeue_all(self) -> int:
        """The pipeline is gone with every KV block: each running sequence goes back to the front of the queue, to
        be prefilled again from its prompt and the tokens it already has (nothing is emitted twice). Returns how
        many. Steps still out are forgotten: their results are ignored. The prefix cache is emptied: a replaced
        worker's pool starts empty."""
        requeued = list(self._running)
        self._requeue(requeued)
        self.clear_prefix_cache()
        self._steps.clear()
        self.stats.num_in_flight = 0
        return len(requeued)

    def clear_prefix_cache(self) -> None:
        """Forget every cached block, in both pools (the stages' keys and values are gone, or not to be used)."""
        self.allocator.clear_cache()
        if self.window_allocator is not None:
            self.window_allocator.clear_cache()

    def fail_unfit(self) -> list[Output]:
        """After the pools changed (a rebuilt pipeline's can be smaller: a replacement worker with less memory), end
        each waiting sequence they can never hold with a :class:`ContextLengthError`, as :meth:`add` refuses such a
        request; the others keep their places. Without this the first of them would wait at the queue's head for
        ever (first come, first served), and every request behind it."""
        outputs = []
        for seq in list(self._waiting):
            pools = [(self._blocks_needed(seq), self.allocator.num_blocks, "KV cache")]
            if self.window_allocator is not None:
                pools.append((self._window_needed(seq), self.window_allocator.num_blocks, "windowed layers' pool"))
            unfit = [(needed, size, name) for needed, size, name in pools if needed > size]
            if not unfit:
                continue
            needed, size, name = unfit[0]
            self._waiting.remove(seq)
            outputs.append(self._finish(seq, FinishReason.ERROR, error=ContextLengthError(
                f"prompt + max_new_tokens = {seq.total_tokens} tokens needs {needed} blocks of the {name}, and the "
                f"rebuilt pipeline's holds {size}: a replacement worker has less memory; lower max_new_tokens, or "
                "give the workers more cache.kv_cache_mb", param="max_tokens")))
        self.stats.num_waiting = len(self._waiting)
        return outputs

    def fail_all(self, error: BaseException) -> list[Output]:
        """End every waiting and running sequence with ``error`` (the cluster cannot serve them)."""
        outputs = [self._finish(seq, FinishReason.ERROR, error=error) for seq in [*self._waiting, *self._running]]
        self._waiting.clear()
        self._steps.clear()
        self.stats.num_in_flight = 0
        self.stats.num_waiting = self.stats.num_running = 0
        return outputs

    def close(self) -> list[Output]:
        """End every waiting and running sequence with ``CANCELLED`` (the engine is shutting down)."""
        outputs = [self._finish(seq, FinishReason.CANCELLED) for seq in [*self._waiting, *self._running]]
        self._waiting.clear()
        self.stats.num_waiting = self.stats.num_running = 0
        return outputs
