"""The one interface between a front end (the HTTP API) and the engine, in the spirit of vLLM's ``EngineClient``.

Serving depends on this protocol only, never on the scheduler, the allocator, the manifest or
the pipeline behind it: :class:`chatloop.ChatLoop` implements it, and a test can hand the
HTTP app any object that does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .pipeline import StageReport
from .requests import SamplingParams, SequenceEvent

__all__ = ["EngineClient", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the coordinator's state (metrics and status read it)."""

    num_waiting: int
    num_running: int
    num_in_flight: int
    last_batch_size: int
    generated_tokens: int
    max_in_flight: int = 1
    """Micro-batches the scheduler keeps in flight at most: the stages that can compute at once."""
    finished: dict[str, int] = field(default_factory=dict)
    """Sequences that ended, by finish reason."""
    queue_capacity: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_block_size: int = 0
    replays: int = 0
    """Sequences prefilled again after a lost worker was replaced."""
    cluster_state: str = "serving"
    """serving, recovering or degraded."""
    recovery_seconds: list[float] = field(default_factory=list)
    """Each recovery's time, from noticing the lost worker to the rebuilt pipeline."""
    worker_restarts: dict[str, int] = field(default_factory=dict)
    prefix_cache_queries: int = 0
    """Tokens looked up in the prefix cache at admission (prompts, and what replayed sequences had generated)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found: their keys and values were not computed again."""
    kv_blocks_cached: int = 0
    """KV blocks in the prefix cache (held by sequences or not; those not held count as free)."""
    speculative_drafted_tokens: int = 0
    """Tokens drafted by speculative decoding and verified by the pipeline."""
    speculative_accepted_tokens: int = 0
    """Of those, tokens the model accepted."""
    kv_window_blocks_total: int = 0
    """Blocks of the windowed layers' own pool (a model that mixes windowed and full layers); 0: one pool."""
    kv_window_blocks_free: int = 0

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def kv_window_blocks_used(self) -> int:
        return self.kv_window_blocks_total - self.kv_window_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        """The share of looked-up tokens found in the prefix cache (0 before any)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def speculative_acceptance_rate(self) -> float:
        """The share of drafted tokens the model accepted (0 before any)."""
        drafted = self.speculative_drafted_tokens
        return self.speculative_accepted_tokens / drafted if drafted else 0.0


class EngineClient(Protocol):
    """What a front end may ask of a running engine."""

    @property
    def context_length(self) -> int:
        """The most tokens one request may hold, prompt and completion together."""

    @property
    def max_prompt_chars(self) -> int:
        """No prompt text longer than this can fit the context (the context times the longest token's characters)."""

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to ``vocab_size - 1``."""

    @property
    def stage_names(self) -> list[str]:
        """The stages, in pipeline order."""

    @property
    def token_bytes(self) -> Sequence[bytes]:
        """Each token id's own bytes (a token may hold part of a UTF-8 character)."""

    def encode(self, prompt: str | Sequence[int] | list[dict], chat: bool = False) -> list[int]:
        """Token ids of text, of ids, or (with ``chat``) of chat messages; ``ValueError`` when it cannot."""

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[SequenceEvent], None]
    ) -> Callable[[], None]:
        """Queue a request; ``emit`` gets its events (on the engine's thread, must not block). Returns ``cancel()``.

        Raises ``RequestError`` (the request cannot run), ``QueueFullError`` or ``SchedulerClosedError``.
        """

    def stats(self) -> EngineStats:
        """The coordinator's counters now."""

    def describe_stages(self, timeout: float) -> list[StageReport]:
        """Every stage's report (blocking, up to about ``timeout`` seconds); a stage that does not answer is down."""
