"""Speculative decoding: the n-gram lookup, the acceptance rule (checked statistically against the model's
distribution), and in one process on tiny random models: the same greedy tokens with and without drafts (n-gram and
a draft model, one request and a mixed batch), the KV blocks all back after load, and bad input refused."""

from __future__ import annotations

import json
import queue
import random

import pytest
import torch
from test_policy import CharTokenizer, InstantPipeline

from chatloop.engine import LocalPipeline, SamplingParams, Scheduler
from chatloop.engine.errors import RequestError
from chatloop.engine.pipeline import compute_thread
from chatloop.engine.requests import AcceptedTokens, SamplerInput
from chatloop.engine.speculation import (
    DraftModelProposer,
    DraftRequest,
    NgramProposer,
    Proposer,
    accept_or_resample,
    lookup,
    verify,
)

# ---- the n-gram lookup ------------------------------------------------------------------------------------------


def test_ngram_lookup_drafts_what_followed_the_latest_longest_match():
    assert lookup([1, 2, 3, 4, 9, 1, 2, 3], 2) == [4, 9]
    assert lookup([5, 2, 3, 7, 1, 2, 3, 8, 2, 3], 3) == [8, 2, 3]  # the latest occurrence of [2, 3] wins
    assert lookup([1, 2, 3, 6, 0, 2, 3, 7, 1, 2, 3], 1) == [6]  # [1, 2, 3] is longer than the later [2, 3]
    assert lookup([1, 2, 3, 4], 4) == []  # no earlier occurrence
    assert lookup([7, 7], 3) == []  # (a one-token suffix is too short to go by)
    assert NgramProposer().propose([DraftRequest(0, (4, 5, 6, 4, 5), 1, None)])[0].token_ids == (6,)


# ---- the rule ---------------------------------------------------------------------------------------------------

CHI2_999 = {5: 20.52, 7: 24.32}
"""The chi-square distribution's 99.9th percentile, by degrees of freedom."""


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("certain", [False, True], ids=["sampled-draft", "one-hot-draft"])
def test_the_rejection_rule_leaves_every_token_distributed_as_the_models(certain):
    rng = torch.Generator().manual_seed(5)
    p = torch.tensor([0.30, 0.02, 0.15, 0.05, 0.20, 0.08, 0.12, 0.08], dtype=torch.float64)
    q = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.05, 0.10, 0.05, 0.10], dtype=torch.float64)  # far from p
    n = 20_000
    counts = torch.zeros(8, dtype=torch.float64)
    accepted = 0
    for _ in range(n):
        draft = 2 if certain else int(torch.multinomial(q, 1, generator=rng))
        ok, token = accept_or_resample(p, draft, None if certain else q, rng)
        assert ok == (token == draft) or (ok and token == draft)
        accepted += ok
        counts[token] += 1
    assert chi_square(counts, p) < CHI2_999[7]
    # The acceptance rate is sum(min(p, q)) (q one-hot at 2: p(2)), within 4 standard deviations.
    rate = float(p[2]) if certain else float(torch.minimum(p, q).sum())
    assert abs(accepted / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5


def test_a_rule_that_always_accepts_would_fail_the_check():
    """The check can fail: the draft's own distribution is told apart from the model's."""
    p = torch.tensor([0.30, 0.02, 0.15, 0.05, 0.20, 0.08, 0.12, 0.08], dtype=torch.float64)
    q = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.05, 0.10, 0.05, 0.10], dtype=torch.float64)
    counts = torch.bincount(torch.multinomial(q, 20_000, replacement=True,
                                              generator=torch.Generator().manual_seed(5)), minlength=8).double()
    assert chi_square(counts, p) > CHI2_999[7]


def test_a_sampled_verification_with_a_drafts_probabilities_keeps_the_models_distribution():
    """Through :func:`verify`, with the draft's q rows as they travel: the first token of a step, over many seeds, is
    distributed as the model's tempered, top-k cut distribution at that place."""
    torch.manual_seed(3)
    logits = torch.randn(3, 8) * 1.5
    q = torch.softmax(torch.randn(2, 8), -1)
    params = dict(temperature=0.8, top_k=6)
    p0 = torch.softmax(logits[0].double() / 0.8, -1)
    p0[p0 < p0.topk(6).values[-1]] = 0
    p0 /= p0.sum()
    rng = torch.Generator().manual_seed(1)
    first = torch.zeros(8, dtype=torch.float64)
    for seed in range(6000):
        drafts = tuple(int(torch.multinomial(q[i], 1, generator=rng)) for i in range(2))
        out = verify(logits, sampler(seed=seed, drafts=drafts, draft_probs=q, **params)).token_ids
        first[out[0]] += 1
    kept = p0 > 0
    assert first[~kept].sum() == 0  # never a token top-k cut
    assert chi_square(first[kept], p0[kept]) < CHI2_999[int(kept.sum()) - 1]


def test_a_draft_model_catching_up_drafts_what_it_drafts_fed_at_once(split):
    from chatloop.engine.speculation import DraftRequest

    parts = split("llama", 1)
    prompt = prompts(1, seed=5)[0]
    stepped, executor = draft_model(parts)
    at_once, executor2 = draft_model(parts)
    try:
        first = executor.submit(stepped.propose, [DraftRequest(1, tuple(prompt), 3, sampler())]).result()[0]
        # Three tokens the draft has not cached (the first differs from its draft): a catch-up step of three.
        known = (*prompt, (first.token_ids[0] + 1) % 50, 7, 9)
        caught_up = executor.submit(stepped.propose, [DraftRequest(1, known, 5, sampler())]).result()[0]
        fresh = executor2.submit(at_once.propose, [DraftRequest(1, known, 5, sampler())]).result()[0]
        assert len(caught_up.token_ids) == 5 and caught_up.token_ids == fresh.token_ids
        assert stepped._sequences[1].tokens == [*known, *caught_up.token_ids[:-1]]
        assert executor.submit(torch.get_num_threads).result() == 1  # the draft's own OpenMP threads
    finally:
        executor.shutdown()
        executor2.shutdown()


def sampler(**kw) -> SamplerInput:
    options = dict(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=11, step=3)
    options.update(kw)
    return SamplerInput(**options)


def test_greedy_verification_keeps_the_drafts_the_model_agrees_with_then_its_own_token():
    logits = torch.full((4, 10), -5.0)
    for i, best in enumerate([4, 6, 1, 8]):
        logits[i, best] = 5.0
    assert verify(logits, sampler(drafts=(4, 6, 1))).token_ids == (4, 6, 1, 8)  # all accepted, and a bonus
    assert verify(logits, sampler(drafts=(4, 7, 1))).token_ids == (4, 6)  # the second corrected
    assert verify(logits, sampler(drafts=(0, 6, 1))).token_ids == (4,)
    assert verify(logits, sampler(drafts=(4, 7, 1))).num_accepted == 1


def test_a_seeded_sampled_verification_with_certain_drafts_draws_what_plain_sampling_draws():
    from chatloop.engine.sampling import sample

    torch.manual_seed(0)
    logits = torch.randn(5, 16)
    plain = [sample(logits[i : i + 1], [sampler(temperature=0.9, step=3 + i)])[0] for i in range(5)]
    # Drafts that are the tokens plain sampling drew are all accepted; a wrong one is replaced by plain's draw.
    assert verify(logits, sampler(temperature=0.9, drafts=tuple(plain[:4]))).token_ids == tuple(plain)
    wrong = (plain[0], (plain[1] + 1) % 16)
    assert verify(logits, sampler(temperature=0.9, drafts=wrong)).token_ids == tuple(plain[:2])


# ---- tiny models in one process ---------------------------------------------------------------------------------

NUM_BLOCKS, BLOCK = 96, 4


@pytest.fixture(scope="module")
def split(tiny_checkpoint, tmp_path_factory):
    from chatloop.partition.splitter import split_model

    def make(family: str, parts: int, seed: int = 0):
        out = tmp_path_factory.mktemp(f"{family}-{parts}-{seed}")
        if seed == 0:
            split_model(tiny_checkpoint(family).path, out, parts, progress=False)
        else:  # another random model of the same shape and vocabulary
            from tests.conftest import TINY_MOE_VARIANTS, build_tiny_model, build_tiny_moe

            src = tmp_path_factory.mktemp(f"{family}-seed{seed}")
            build = build_tiny_moe if family in TINY_MOE_VARIANTS else build_tiny_model
            build(family, seed=seed).save_pretrained(src)
            split_model(src, out, parts, progress=False)
        return out

    return make


def local_pipeline(parts, pack_weights: bool = False) -> LocalPipeline:
    from chatloop.partition import Manifest, load_stage
    from chatloop.stage import StageRunner

    manifest = Manifest.load(parts)
    return LocalPipeline([StageRunner(load_stage(parts, i, manifest=manifest, pack_weights=pack_weights), NUM_BLOCKS,
                                      BLOCK)
                          for i in range(manifest.num_partitions)])


def draft_model(parts) -> tuple[DraftModelProposer, object]:
    """A draft model of one stage, loaded on its own thread, and that thread."""
    from chatloop.partition import load_stage

    executor = compute_thread("draft")

    def load():
        model = load_stage(parts, 0)
        return DraftModelProposer(model, model.new_cache(64, BLOCK), 64, BLOCK)

    return executor.submit(load).result(), executor


def run(scheduler: Scheduler, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """Submit every prompt at once; each one's (token ids, last event); ``scheduler.texts`` and ``scheduler.scores``
    get each one's text and token scores."""
    done: queue.Queue = queue.Queue()
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        scheduler.submit(prompt, p, lambda e, i=i: done.put((i, e)))
    tokens: list[list[int]] = [[] for _ in prompts]
    scheduler.texts = [""] * len(prompts)
    scheduler.scores = [[] for _ in prompts]
    last: list = [None] * len(prompts)
    while any(e is None for e in last):
        i, event = done.get(timeout=60)
        assert event.error is None, event.error
        tokens[i] += event.token_ids
        scheduler.texts[i] += event.text
        scheduler.scores[i] += event.logprobs
        if event.finish_reason is not None:
            last[i] = event
    return list(zip(tokens, last))


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(2, 120) for _ in range(6)]
    return [base * 2 + [rng.randrange(2, 120) for _ in range(rng.randrange(1, 6))] + base[:3] for _ in range(n)]


def generate(parts, prompts_, params_, draft=None, pack_weights: bool = False, **options) -> tuple[list, Scheduler]:
    pipeline = local_pipeline(parts, pack_weights)
    proposer, executor = draft if draft is not None else (None, None)
    scheduler = Scheduler(pipeline, CharTokenizer(), batching_window_ms=0, max_batch_size=8,
                          draft_proposer=proposer, draft_executor=executor, **options)
    steps: list = []
    pipeline.add_observer(steps.append)
    scheduler.num_steps = lambda: len(steps)  # (micro-batches through the pipeline)
    try:
        return run(scheduler, prompts_, params_), scheduler
    finally:
        scheduler.close()
        pipeline.close()


GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


FAMILIES = ["llama", "qwen2", "gpt2", "qwen3", "granite", "olmo2", "gemma2", "gemma3_text", "qwen3_moe"]
"""Every family (Phi-3, whose longrope bounds the drafts before its switch: below; an all-layer window:
tests/unit/test_sliding_window.py)."""


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_are_the_same_with_ngram_drafts_and_with_a_draft_model(family, split):
    parts = split(family, 2)
    batch = prompts(1)
    plain, _ = generate(parts, batch, [GREEDY])
    ngram, s1 = generate(parts, batch, [GREEDY], speculative_method="ngram", num_speculative_tokens=4)
    other = draft_model(split(family, 1, seed=1))  # another random model: many drafts are rejected
    drafted, s2 = generate(parts, batch, [GREEDY], draft=other, speculative_method="draft",
                           num_speculative_tokens=3)
    same = draft_model(split(family, 1))  # the model itself as its draft: every draft is accepted
    exact, s3 = generate(parts, batch, [GREEDY], draft=same, speculative_method="draft", num_speculative_tokens=5)
    assert ngram[0][0] == drafted[0][0] == exact[0][0] == plain[0][0]
    assert plain[0][1].drafted_tokens is None
    assert s2.stats.drafted_tokens > 0
    if family in ("llama", "qwen2", "gpt2"):  # (others' random pairs may agree throughout, granite's does)
        assert s2.stats.drafted_tokens > s2.stats.accepted_tokens  # rejections happened and were rolled back
    assert s3.stats.accepted_tokens == s3.stats.drafted_tokens > 0
    assert exact[0][1].drafted_tokens == s3.stats.drafted_tokens and exact[0][1].accepted_tokens > 0
    # Fewer passes through the pipeline than tokens: 24 tokens in a prefill (1) and 4 verifications of 5, 5, 5 and 4
    # drafts (6 + 6 + 6 + 5) when every draft is accepted (their keys and values are kept, not computed again).
    assert s3.num_steps() == 1 + 4 and s3.stats.drafted_tokens == 5 + 5 + 5 + 4
    for s in (s1, s2, s3):
        assert s.allocator.num_free == NUM_BLOCKS  # every block back (cached ones count as free)
    for proposer, executor in (other, same):
        assert proposer.num_sequences == 0 and proposer.allocator.num_free == 64
        executor.shutdown()


def test_phi3s_greedy_tokens_across_its_rope_switch_and_window_are_the_same_with_drafts(split):
    """Phi-3 with longrope (switch at 16) and a window of 24, as the engine passes them: 24 greedy tokens after a
    ~20-token prompt cross the window with the long factors (a prompt past the switch) and, after prompts of 9 and
    14 tokens (drafts bounded before the switch), the switch itself; n-gram drafts and the model itself as its draft
    give the tokens plain decoding gives, and every block comes back."""
    from chatloop.models import ModelArgs
    from chatloop.partition import Manifest

    parts = split("phi3", 2)
    args = ModelArgs.from_hf_config(Manifest.load(parts).model_config)
    assert (args.rope_switch, args.kv_window) == (16, 24)
    model = {"rope_switch": args.rope_switch, "kv_window": args.kv_window}  # (as the engine passes them)
    batch = [prompts(1)[0], prompts(1)[0][:9], prompts(1)[0][:14]]
    plain, _ = generate(parts, batch, [GREEDY] * 3, **model)
    ngram, s1 = generate(parts, batch, [GREEDY] * 3, speculative_method="ngram", num_speculative_tokens=4, **model)
    same = draft_model(split("phi3", 1))
    exact, s2 = generate(parts, batch, [GREEDY] * 3, draft=same, speculative_method="draft", num_speculative_tokens=6,
                         **model)
    same[1].shutdown()
    assert [t for t, _ in ngram] == [t for t, _ in exact] == [t for t, _ in plain]
    # (the draft keeps its keys of before the switch, rotated with the short factors: some of its drafts past it
    # are rejected, which the verification rolls back)
    assert 0 < s2.stats.accepted_tokens <= s2.stats.drafted_tokens and s1.stats.drafted_tokens > 0
    for s in (s1, s2):
        assert s.allocator.num_free == NUM_BLOCKS


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_a_packed_llamas_verify_steps_take_the_one_call_step_and_keep_the_greedy_tokens(quantize, split,
                                                                                        tiny_checkpoint, tmp_path,
                                                                                        monkeypatch):
    from chatloop.models.fused_decode import LlamaDecodeKernel
    from chatloop.partition.splitter import split_model

    split_model(tiny_checkpoint("llama").path, tmp_path, 2, quantize=quantize, progress=False)
    new_tokens: list[int] = []  # of each sequence in each micro-batch the one-call step ran
    call = LlamaDecodeKernel.__call__
    monkeypatch.setattr(LlamaDecodeKernel, "__call__", lambda self, x, *a: new_tokens.append(x.shape[1]) or
                        call(self, x, *a))
    batch = prompts(2, seed=5)
    plain, _ = generate(tmp_path, batch, [GREEDY] * 2, pack_weights=True)
    assert 1 in new_tokens and 6 not in new_tokens  # (6 new tokens: the prompts are longer)
    ngram, s1 = generate(tmp_path, batch, [GREEDY] * 2, pack_weights=True, speculative_method="ngram",
                         num_speculative_tokens=4)
    draft = draft_model(split("llama", 1))  # the float32 model: every draft accepted (float32), or most (int4)
    drafted, s2 = generate(tmp_path, batch, [GREEDY] * 2, draft=draft, pack_weights=True,
                           speculative_method="draft", num_speculative_tokens=5)
    draft[1].shutdown()
    assert [t for t, _ in ngram] == [t for t, _ in drafted] == [t for t, _ in plain]
    assert s1.stats.drafted_tokens > 0 and s2.stats.accepted_tokens > 0
    assert 6 in new_tokens  # a verify step of 5 drafts and the token before them, in the one call


def test_a_mixed_batch_gives_every_request_its_own_greedy_tokens_and_the_blocks_come_back(split):
    parts = split("llama", 2)
    batch = prompts(6, seed=9)
    mixed = [GREEDY, SamplingParams(max_new_tokens=9, ignore_eos=True, speculative_tokens=0), GREEDY,
             SamplingParams(max_new_tokens=17, ignore_eos=True, speculative_tokens=7),
             SamplingParams(max_new_tokens=1, ignore_eos=True), SamplingParams(max_new_tokens=12, stop=("!",))]
    plain, _ = generate(parts, batch, [SamplingParams(max_new_tokens=p.max_new_tokens, ignore_eos=p.ignore_eos,
                                                      stop=p.stop) for p in mixed])
    spec, s = generate(parts, batch, mixed, speculative_method="ngram", num_speculative_tokens=4)
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert [e.finish_reason for _, e in spec] == [e.finish_reason for _, e in plain]
    assert spec[1][1].drafted_tokens is None and spec[0][1].drafted_tokens is not None
    assert s.stats.drafted_tokens > 0 and s.allocator.num_free == NUM_BLOCKS


def test_logprobs_and_seeded_sampling_are_those_without_ngram_drafts(split):
    parts = split("llama", 2)
    batch = prompts(2, seed=4)
    sampled = [SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=0.8, seed=5, logprobs=2),
               SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=1)]
    plain, p = generate(parts, batch, sampled)
    spec, s = generate(parts, batch, sampled, speculative_method="ngram", num_speculative_tokens=4)
    assert s.stats.drafted_tokens > 0
    assert [t for t, _ in spec] == [t for t, _ in plain]
    for with_drafts, without in zip(s.scores, p.scores):  # each token's score computed at a draft's place
        assert [x.token_id for x in with_drafts] == [x.token_id for x in without] and len(without) == 16
        assert [x.logprob for x in with_drafts] == pytest.approx([x.logprob for x in without], abs=1e-4)
        assert [[t for t, _ in x.top] for x in with_drafts] == [[t for t, _ in x.top] for x in without]


def test_a_stop_string_inside_the_accepted_drafts_ends_the_text_before_it(split):
    parts = split("llama", 2)
    batch = prompts(1)
    _, p = generate(parts, batch, [GREEDY])
    text = p.texts[0]
    stop = text[10:12]  # (the model itself as its draft: the stop string arrives inside a run of accepted drafts)
    stopped = SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,))
    without, _ = generate(parts, batch, [stopped])
    same = draft_model(split("llama", 1))
    spec, s = generate(parts, batch, [stopped], draft=same, speculative_method="draft", num_speculative_tokens=8)
    same[1].shutdown()
    assert s.texts[0] == text[: text.index(stop)] and spec[0][1].finish_reason == "stop"
    assert spec[0][0] == without[0][0] and s.allocator.num_free == NUM_BLOCKS


def test_seeded_sampling_with_a_draft_model_is_reproducible(split):
    parts = split("llama", 2)
    batch = prompts(1, seed=4)
    p = [SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=1.0, seed=7)]
    runs = []
    for _ in range(2):
        draft = draft_model(split("llama", 1, seed=1))
        runs.append(generate(parts, batch, p, draft=draft, speculative_method="draft", num_speculative_tokens=3)[0])
        draft[1].shutdown()
    assert runs[0][0][0] == runs[1][0][0] and len(runs[0][0][0]) == 16


class BrokenProposer(Proposer):
    runs_inline = False

    def propose(self, requests):
        raise RuntimeError("out of memory")


def test_a_draft_model_that_fails_turns_speculation_off_and_requests_go_on(split, caplog):
    parts = split("llama", 2)
    batch = prompts(1)
    plain, _ = generate(parts, batch, [GREEDY])
    executor = compute_thread("draft")
    spec, s = generate(parts, batch, [GREEDY], draft=(BrokenProposer(), executor), speculative_method="draft")
    executor.shutdown()
    assert spec[0][0] == plain[0][0] and s.stats.drafted_tokens == 0
    assert "draft failed (RuntimeError: out of memory): it is off from now on" in caplog.text
    assert "draft" not in s.policy.draft_methods


def test_bad_speculation_requests_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="speculative_tokens must be from 1 to 16"):
        SamplingParams(speculative_tokens=17)
    with pytest.raises(ValueError, match="speculative_method must be ngram, draft, off"):
        SamplingParams(speculative_method="medusa")
    scheduler = Scheduler(InstantPipeline(), CharTokenizer(), speculative_method="ngram")
    try:
        with pytest.raises(RequestError, match="needs a draft model") as e:
            scheduler.submit([5, 6], SamplingParams(speculative_method="draft"), lambda e: None)
        assert e.value.param == "speculative_method"
    finally:
        scheduler.close()


# ---- the Python API: a draft model from configuration -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folders(tiny_checkpoint, tmp_path_factory):
    """A tiny Llama with the tiny tokenizer, another random one as its draft, and one with another tokenizer."""
    import shutil

    from tests.conftest import build_tiny_model, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("spec-api")
    model = root / "model"
    shutil.copytree(tiny_checkpoint("llama").path, model)
    save_tiny_tokenizer(model)
    draft = root / "draft"
    build_tiny_model("llama", seed=1).save_pretrained(draft)
    save_tiny_tokenizer(draft)
    alien = root / "alien"
    build_tiny_model("llama", seed=2).save_pretrained(alien)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}  # the same size, other tokens
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                            unk_token="w0").save_pretrained(alien)
    return root


def api_config(root, *more: str):
    from chatloop import load_config

    return load_config(["cluster=single", "cluster.num_workers=2", f"model.name={root / 'model'}",
                        f"model.partitions_dir={root / 'parts'}", "cache.kv_cache_mb=1", "cache.min_capacity_tokens=64",
                        "speculative.draft_kv_cache_mb=1", *more])


def test_the_api_loads_a_draft_model_and_gives_the_same_greedy_text_with_usage(tiny_folders):
    from chatloop import ChatLoop

    prompt = prompts(1, seed=5)[0]
    with ChatLoop.start(api_config(tiny_folders)) as llm:
        plain = llm.generate(prompt, max_new_tokens=20, ignore_eos=True)
        ngram = llm.generate(prompt, max_new_tokens=20, ignore_eos=True, speculative_method="ngram")
        with pytest.raises(RequestError, match="needs a draft model"):
            llm.generate(prompt, max_new_tokens=4, speculative_method="draft")
    draft = f"speculative.draft_model={tiny_folders / 'draft'}"
    with ChatLoop.start(api_config(tiny_folders, "speculative=draft", draft, "speculative.draft_quantization=null",
                                   "speculative.num_tokens=3", "speculative.draft_threads=2")) as llm:
        assert llm.scheduler.proposers["draft"].num_threads == 2
        drafted = llm.generate(prompt, max_new_tokens=20, ignore_eos=True)
        off = llm.generate(prompt, max_new_tokens=20, ignore_eos=True, speculative_tokens=0)
        stats = llm.stats()
    assert plain.drafted_tokens is None and off.drafted_tokens is None
    assert ngram.token_ids == drafted.token_ids == off.token_ids == plain.token_ids
    assert drafted.drafted_tokens > 0 and 0 <= drafted.accepted_tokens <= drafted.drafted_tokens
    assert stats.speculative_drafted_tokens == drafted.drafted_tokens
    assert stats.speculative_acceptance_rate == drafted.accepted_tokens / drafted.drafted_tokens
    assert stats.kv_blocks_free == stats.kv_blocks_total


@pytest.mark.parametrize(("overrides", "message"), [
    (["speculative.num_tokens=0"], "speculative.num_tokens=0: choose 1 to 16"),
    (["speculative.num_tokens=17"], "speculative.num_tokens=17: choose 1 to 16"),
    (["speculative.method=draft"], "speculative.method=draft needs speculative.draft_model"),
    (["speculative.method=medusa"], "speculative.method='medusa': choose null, ngram or draft"),
    (["speculative.draft_threads=0"], r"speculative.draft_threads=0: need at least 1 thread, or null"),
    (["speculative=draft", "speculative.draft_model={root}/alien", "speculative.draft_quantization=null"],
     "has another tokenizer .*: choose a draft of the model's family and tokenizer"),
    (["speculative=draft", "speculative.draft_model={root}/draft", "speculative.draft_quantization=null",
      "speculative.max_draft_mb=0.5"],
     r"needs 1\.\d MiB \(weights and its KV cache\), more than speculative.max_draft_mb=0.5 \(0.5 MiB\): set "
     "speculative.draft_quantization=int4"),
])
def test_bad_speculation_settings_are_refused_at_start_with_what_to_change(tiny_folders, overrides, message):
    from chatloop import ChatLoop

    with pytest.raises(ValueError, match=message):
        ChatLoop.start(api_config(tiny_folders, *[o.format(root=tiny_folders) for o in overrides])).shutdown()


def test_over_http_a_request_chooses_speculation_and_its_usage_and_the_metrics_count_the_drafts(tiny_folders):
    from fastapi.testclient import TestClient

    from chatloop import ChatLoop
    from chatloop.serving import create_app

    prompt = prompts(1, seed=5)[0]
    body = {"model": "m", "prompt": prompt, "max_tokens": 20, "ignore_eos": True}
    cfg = api_config(tiny_folders, "server.model_name=m")
    with ChatLoop.start(cfg) as llm, TestClient(create_app(llm, cfg)) as client:
        plain = client.post("/v1/completions", json=body).json()
        ngram = client.post("/v1/completions", json={**body, "speculative_method": "ngram", "speculative_tokens": 5})
        stream = client.post("/v1/completions", json={**body, "speculative_method": "ngram", "stream": True,
                                                      "stream_options": {"include_usage": True}})
        draft = client.post("/v1/completions", json={**body, "speculative_method": "draft"})
        too_many = client.post("/v1/completions", json={**body, "speculative_tokens": 17})
        metrics = client.get("/metrics").text
        schema = client.get("/openapi.json").json()
    assert "completion_tokens_details" not in plain["usage"]
    assert ngram.status_code == 200 and ngram.json()["choices"][0]["text"] == plain["choices"][0]["text"]
    details = ngram.json()["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] > 0
    events = [line for line in stream.text.splitlines() if line.startswith("data: {")]
    assert '"completion_tokens_details"' in events[-1]
    streamed = "".join(c["text"] for e in events for c in json.loads(e[6:]).get("choices", []))
    assert streamed == plain["choices"][0]["text"]
    assert draft.status_code == 400 and "needs a draft model" in draft.json()["error"]["message"]
    assert too_many.status_code in (400, 422)
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if not line.startswith("#")}
    drafted = values["chatloop_speculative_drafted_tokens_total"]
    accepted = values["chatloop_speculative_accepted_tokens_total"]
    streamed_details = json.loads(events[-1][6:])["usage"]["completion_tokens_details"]
    assert accepted == details["accepted_prediction_tokens"] + streamed_details["accepted_prediction_tokens"]
    assert drafted == accepted + details["rejected_prediction_tokens"] + streamed_details["rejected_prediction_tokens"]
    method = schema["components"]["schemas"]["CompletionRequest"]["properties"]["speculative_method"]
    assert ["ngram", "off"] in [o.get("enum") for o in method.get("anyOf", [method])]


def test_before_a_rope_switch_no_draft_reaches_it_and_the_switch_step_is_a_tokens_own():
    """longrope's switch at position 8, k = 4: after a 5-token prompt a sequence drafts 2 (positions 6 and 7); all
    accepted, its next step is the switch's (computed again from its first token, all 9 known tokens, no drafts);
    past the switch it drafts 4 again."""
    from test_policy import make_policy

    policy = make_policy(speculative_method="ngram", num_speculative_tokens=4, rope_switch=8)
    policy.add([5, 6, 5, 6, 5], SamplingParams(max_new_tokens=12, ignore_eos=True), 0.0)
    steps, _ = policy.schedule(0.0)
    policy.complete(steps[0].id, [6])
    (step,), _ = policy.schedule(0.0)
    assert step.starts == (5,) and step.num_drafts == (2,)
    policy.complete(step.id, [AcceptedTokens((5, 6, 5), 2)])
    (step,), _ = policy.schedule(0.0)
    assert step.starts == (0,) and len(step.token_ids[0]) == 9 and not step.num_drafts
    policy.complete(step.id, [6])
    (step,), _ = policy.schedule(0.0)
    assert step.starts == (9,) and step.num_drafts == (4,)
    on = make_policy(speculative_method="ngram")
    on.add([5, 6, 5, 6, 5], SamplingParams(max_new_tokens=8), 0.0)
    steps, _ = on.schedule(0.0)
    on.complete(steps[0].id, [6])
    steps, _ = on.schedule(0.0)
    assert steps[0].num_drafts == (4,) and steps[0].contexts == ((5, 6, 5, 6, 5, 6),)


def test_k_shrinks_as_more_sequences_draft_in_one_micro_batch_and_never_passes_max_new_tokens():
    from test_policy import make_policy

    policy = make_policy(speculative_method="ngram", num_speculative_tokens=4, max_batch_size=4)
    for max_new in (8, 8, 2):
        policy.add([5, 6, 5, 6, 5], SamplingParams(max_new_tokens=max_new), 0.0)
    steps, _ = policy.schedule(0.0)  # the three prompts in one prefill micro-batch
    policy.complete(steps[0].id, [6, 6, 6])
    steps, _ = policy.schedule(0.0)
    # Three sequences draft in one micro-batch: 4 // 3 = 1 each; the third may generate one token more: none.
    assert steps[0].num_drafts == (1, 1, 0)
    # Each table covers its last token and its drafts: positions 5 and 6, blocks of 4 tokens.
    assert [len(t) for t in steps[0].block_tables] == [2, 2, 2]
    alone = make_policy(speculative_method="ngram", num_speculative_tokens=4)
    alone.add([5, 6, 5, 6, 5], SamplingParams(max_new_tokens=8, speculative_tokens=7), 0.0)
    steps, _ = alone.schedule(0.0)
    alone.complete(steps[0].id, [6])
    steps, _ = alone.schedule(0.0)
    assert steps[0].num_drafts == (6,)  # the request's k (7), but no draft past its 8th token
