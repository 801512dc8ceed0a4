"""Speculative decoding: who drafts tokens, and the rule by which the model accepts them.

A sequence's next ``k`` tokens are guessed cheaply (a :class:`Proposer`), fed after its last token in one step
through every stage, and the last stage keeps the longest prefix of guesses the model agrees with, plus one token of
its own (:func:`verify`): a pass through the pipeline yields 1 to k + 1 tokens instead of one.

- :class:`NgramProposer` looks the last few tokens up in the prompt and output so far and drafts what followed them
  there (prompt lookup): free, and good where an answer quotes its context.
- :class:`DraftModelProposer` runs a small model of the same tokenizer in this process, on a thread of its own, with
  a KV cache of its own (its positions past the accepted tokens are overwritten by the next drafts).

The rule: greedy requests accept a draft while it is the model's most likely token, so their output is the same as
without speculation. Sampled requests use the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023):
accept draft ``d`` drawn from the draft's ``q`` with probability ``min(1, p(d) / q(d))``, else draw from
``norm(max(0, p - q))``, which leaves every token distributed as the model's ``p``. Where ``q`` is certain (one-hot:
an n-gram, or a greedy draft) that is the same as drawing from ``p`` with the step's own seeded generator and
accepting when it drew the draft, so a seeded request gives the tokens it gives without speculation.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .blocks import BlockAllocator
from .requests import GREEDY_BELOW, AcceptedTokens, SamplerInput
from .sampling import distribution, generator, sample

__all__ = [
    "NGRAM_MAX", "NGRAM_MIN", "Draft", "DraftModelProposer", "DraftRequest", "NgramProposer", "Proposer",
    "accept_or_resample", "verify",
]

log = logging.getLogger(__name__)

NGRAM_MAX = 4
"""The longest suffix the n-gram proposer looks up (longer matches are tried first)."""
NGRAM_MIN = 2
"""The shortest: a single token recurs too often to predict what follows it."""


@dataclass(frozen=True)
class DraftRequest:
    """One sequence to draft for: its known tokens (prompt and output), how many to draft, how it samples."""

    sequence_id: int
    token_ids: tuple[int, ...]
    num_tokens: int
    sampling: SamplerInput


@dataclass(frozen=True)
class Draft:
    """Drafted token ids, and the draft's probabilities of each place (float32 [len(token_ids), V]) where it sampled
    them; None where each draft was certain."""

    token_ids: tuple[int, ...] = ()
    probs: torch.Tensor | None = None


class Proposer(ABC):
    """Drafts tokens for sequences; ``runs_inline`` ones are cheap enough for the scheduler's own thread."""

    runs_inline = True

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        """One draft per request, of at most its ``num_tokens`` tokens (maybe none)."""

    def release(self, sequence_id: int) -> None:  # noqa: B027 - only proposers that keep state per sequence
        """Forget sequence ``sequence_id`` (it ended)."""

    def reset(self) -> None:  # noqa: B027
        """Forget every sequence (the pipeline was lost: every sequence is prefilled again)."""

    def close(self) -> None:  # noqa: B027
        """Release what the proposer holds."""


class NgramProposer(Proposer):
    """Prompt lookup: find the latest earlier occurrence of the sequence's last ``NGRAM_MAX`` .. ``NGRAM_MIN``
    tokens and draft the tokens that followed it."""

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft(tuple(lookup(r.token_ids, r.num_tokens, self.max_n, self.min_n))) for r in requests]


def lookup(tokens: Sequence[int], k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> list[int]:
    """The up to ``k`` tokens after the latest earlier occurrence of ``tokens``' last n tokens (longest n first)."""
    tokens = list(tokens)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        first = suffix[0]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first; not the suffix itself
            if tokens[start] == first and tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


# ---- the rule ---------------------------------------------------------------------------------------------------
def accept_or_resample(
    p: torch.Tensor, draft: int, q: torch.Tensor | None, rng: torch.Generator
) -> tuple[bool, int]:
    """Whether the model, whose distribution is ``p`` [V] (float64), accepts ``draft`` drawn from the draft's ``q``
    [V] (None: certain), and the token to emit: ``draft``, or one drawn from ``norm(max(0, p - q))``."""
    if q is None:  # min(1, p(d) / 1), and norm(p - onehot(d)) is p without d: draw from p, accept if it drew d
        token = int(torch.multinomial(p, 1, generator=rng))
        return token == draft, token
    q = q.double()
    u = float(torch.rand((), generator=rng, dtype=torch.float64))
    if u * float(q[draft]) < float(p[draft]):  # u < p(d) / q(d), without dividing by a small q(d)
        return True, draft
    residual = (p - q).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: nothing is left over, p itself is the residual
        residual = p
    return False, int(torch.multinomial(residual, 1, generator=rng))


def verify(logits: torch.Tensor, p: SamplerInput) -> AcceptedTokens:
    """The tokens one sequence's verification step yields: ``logits`` [len(p.drafts) + 1, V] are the model's at its
    last token and at each draft. The generator of output token ``i`` is seeded with ``p.step + i``, as without
    speculation; a repetition penalty sees the drafts accepted before."""
    drafts = p.drafts
    out: list[int] = []
    history = list(p.history)
    penalised = p.repetition_penalty != 1.0
    for i in range(len(drafts) + 1):
        here = replace(p, step=p.step + i, history=tuple(history) if penalised else (), drafts=(), draft_probs=None)
        if i == len(drafts) or p.temperature < GREEDY_BELOW:
            token = sample(logits[i : i + 1], [here])[0]
            if isinstance(token, str):
                raise ValueError(token)
            out.append(token)
            if i == len(drafts) or token != drafts[i]:
                break
        else:
            q = None if p.draft_probs is None else p.draft_probs[i]
            accepted, token = accept_or_resample(distribution(logits[i], here, here.history), drafts[i], q,
                                                 generator(p.seed, p.step + i))
            out.append(token)
            if not accepted:
                break
        if penalised:
            history.append(out[-1])
    return AcceptedTokens(tuple(out), len(drafts))


# ---- a draft model ----------------------------------------------------------------------------------------------
@dataclass
class _DraftSequence:
    blocks: list[int]
    tokens: list[int]  # whose keys and values are in the draft's cache, in order


class DraftModelProposer(Proposer):
    """A whole small model (one :class:`~chatloop.models.StageModel`, first and last) with its own KV pool, drafting
    for a batch of sequences at once: it catches up with each sequence's known tokens (those it has not cached,
    after the longest prefix it has), then decodes ``k`` tokens. Call :meth:`propose` on the thread that loaded it
    (its compute thread).

    ``num_threads`` is the OpenMP threads its steps use (set on its thread at the first call; None: torch's).
    One by default: the draft shares the coordinator's host with whatever else runs there (stages, other work),
    and a decode step's many OpenMP barriers stall whenever one of its threads loses its core: on the 2-core host
    under other work (load average ~4), a SmolLM2 int4 draft token took 26 ms to 1.3 s on 2 threads, 9 ms on one."""

    runs_inline = False

    def __init__(self, model, cache, num_blocks: int, block_size: int, num_threads: int | None = 1) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads={num_threads}: the draft needs at least one thread (None: torch's)")
        self.model = model
        self.cache = cache
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.num_threads = num_threads
        self._threads_set_on: int | None = None  # the thread whose OpenMP threads were set (they are per thread)
        self._sequences: dict[int, _DraftSequence] = {}
        self._lock = threading.Lock()

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        from ..models.batch import StepBatch, padded

        with self._lock:
            rows = [(i, r, self._sequence(r)) for i, r in enumerate(requests)]
        rows = [(i, r, s) for i, r, s in rows if s is not None and r.num_tokens > 0]
        drafts = [Draft() for _ in requests]
        if not rows:
            return drafts
        if self.num_threads is not None and self._threads_set_on != threading.get_ident():
            torch.set_num_threads(self.num_threads)
            self._threads_set_on = threading.get_ident()
        feeds, starts = [], []
        for _, r, s in rows:
            common = _common_prefix(s.tokens, r.token_ids)
            common = min(common, len(r.token_ids) - 1)  # at least the last known token, for the logits after it
            del s.tokens[common:]
            feeds.append(list(r.token_ids[common:]))
            starts.append(common)
        tokens: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        active = list(range(len(rows)))
        size = self.allocator.block_size
        while active:
            # Each sequence's whole catch-up in one step (a short one, such as a verification's accepted drafts and
            # the model's token, runs the one-call decode step as a one-token step does: a row a token), then one
            # token a step.
            steps = [feeds[a] for a in active]
            tables = [rows[a][2].blocks[: -(-(starts[a] + len(fed)) // size)] for a, fed in zip(active, steps)]
            batch = StepBatch.build([starts[a] for a in active], [len(fed) for fed in steps], tables, size)
            logits = self.model(padded(steps), batch, self.cache)  # [B, V] of each last token
            still = []
            for row, a, fed in zip(logits, active, steps):
                _, r, s = rows[a]
                s.tokens += fed
                starts[a] += len(fed)
                token, q = self._draw(row, r.sampling, len(tokens[a]), tuple(r.token_ids) + tuple(tokens[a]))
                tokens[a].append(token)
                if q is not None:
                    probs[a].append(q)
                feeds[a] = [token]
                if len(tokens[a]) < r.num_tokens:
                    still.append(a)
            active = still
        for a, (i, _, _) in enumerate(rows):
            q = torch.stack(probs[a]).float() if probs[a] else None
            drafts[i] = Draft(tuple(tokens[a]), q)
        return drafts

    @staticmethod
    def _draw(row: torch.Tensor, p: SamplerInput, i: int, history: tuple[int, ...]) -> tuple[int, torch.Tensor | None]:
        """The draft's token ``i`` and its distribution (None: greedy, certain)."""
        if p.temperature < GREEDY_BELOW:
            here = replace(p, history=history if p.repetition_penalty != 1.0 else ())
            return int(sample(row[None].float(), [here])[0]), None
        q = distribution(row.float(), p, history)
        # Its own stream, apart from the model's (seed, step) generators, which the rule uses.
        rng = generator(p.seed ^ 0x5DEECE66D, p.step + i)
        return int(torch.multinomial(q, 1, generator=rng)), q

    def _sequence(self, r: DraftRequest) -> _DraftSequence | None:
        """Its state, with blocks for every position it may reach (None: the draft's pool is full: no drafts)."""
        s = self._sequences.get(r.sequence_id)
        need = self.allocator.blocks_for(len(r.token_ids) + r.num_tokens)
        if s is None:
            blocks = self.allocator.take(need)
            if blocks is None:
                return None
            s = self._sequences[r.sequence_id] = _DraftSequence(blocks, [])
        elif len(s.blocks) < need:
            more = self.allocator.take(need - len(s.blocks))
            if more is None:
                return None
            s.blocks += more
        return s

    def release(self, sequence_id: int) -> None:
        with self._lock:
            s = self._sequences.pop(sequence_id, None)
            if s is not None:
                self.allocator.free(s.blocks)

    def reset(self) -> None:
        with self._lock:
            for sequence_id in list(self._sequences):
                s = self._sequences.pop(sequence_id)
                self.allocator.free(s.blocks)

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
