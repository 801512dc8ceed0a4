"""Log-probabilities: of prompts (scoring) and of generated tokens, equal to transformers' on the same weights."""

from __future__ import annotations

import pytest
import torch

from chatloop import ChatLoop
from chatloop.engine import BlockAllocator, FinishReason, SampledToken, SamplingParams, SchedulerPolicy, ScoredToken

TOLERANCE = 2e-4  # float32 logits through 4 stages vs transformers: log-probabilities agree to ~1e-5
TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
         "Once upon a time, in a kingdom by the sea, there lived a princess who loved to read."]


def _reference(hf, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities [T, V] after each position."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_scores_of_a_text_equal_transformers(llm, smollm2_hf):
    scores = llm.score(TEXTS, top_logprobs=3)
    for text, score in zip(TEXTS, scores):
        ids = llm.encode(text)
        assert score.token_ids == ids and len(score.logprobs) == len(ids) - 1
        expected = _reference(smollm2_hf, ids)
        wanted = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert torch.allclose(torch.tensor(score.logprobs), wanted, atol=TOLERANCE, rtol=0), text
        for position, top in enumerate(score.top):
            values, order = expected[position].topk(3)
            assert [t for t, _ in top] == order.tolist()
            assert torch.allclose(torch.tensor([v for _, v in top]), values, atol=TOLERANCE, rtol=0)
        total = wanted.double().sum().item()
        assert score.total == pytest.approx(total, abs=1e-3)
        assert score.perplexity == pytest.approx(torch.exp(torch.tensor(-total / len(wanted))).item(), rel=1e-4)


def test_scores_do_not_depend_on_the_prefill_chunks(llm, local_smollm2_config):
    whole = llm.score(TEXTS[1])
    with ChatLoop.start(local_smollm2_config("batching.prefill_chunk_tokens=5")) as chunked:
        pieces = chunked.score(TEXTS[1])
    assert len(pieces.logprobs) == len(whole.logprobs)
    # The same float32 sums in other tiles: 1.8e-5 apart at most on this AVX-512 VM (a logprob of -1.9), at c2137bd
    # as now; a chunk that lost its context would be off by far more than this.
    assert torch.allclose(torch.tensor(pieces.logprobs), torch.tensor(whole.logprobs), atol=5e-5, rtol=0)


def test_generated_tokens_come_with_the_models_logprobs(llm, smollm2_hf):
    out = llm.generate(TEXTS[0], max_new_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=True)
    prompt = llm.encode(TEXTS[0])
    expected = _reference(smollm2_hf, prompt + out.token_ids)
    assert [s.token_id for s in out.logprobs] == out.token_ids
    for k, scored in enumerate(out.logprobs):
        row = expected[len(prompt) - 1 + k]
        assert scored.logprob == pytest.approx(row[scored.token_id].item(), abs=TOLERANCE)
        assert [t for t, _ in scored.top] == row.topk(2).indices.tolist()
        assert scored.top[0][0] == scored.token_id  # greedy: the top alternative is the token
    assert [s.token_id for s in out.prompt_logprobs] == prompt[1:]
    sampled = llm.generate(TEXTS[0], max_new_tokens=4, temperature=1.5, seed=3, logprobs=0)
    assert all(s.top == () and s.logprob <= 0 for s in sampled.logprobs)  # the model's, not the tempered ones


def test_max_new_tokens_zero_scores_the_prompt_only(llm):
    out = llm.generate(TEXTS[0], max_new_tokens=0, prompt_logprobs=True)
    assert (out.text, out.token_ids, out.finish_reason) == ("", [], FinishReason.LENGTH)
    assert len(out.prompt_logprobs) == len(llm.encode(TEXTS[0])) - 1
    assert llm.generate(TEXTS[0], max_new_tokens=3).logprobs is None  # not asked, not sent


def test_many_texts_are_scored_within_a_small_queue(local_smollm2_config):
    with ChatLoop.start(local_smollm2_config("batching.max_queue_size=2")) as small:
        texts = [f"Number {i} is {'odd' if i % 2 else 'even'}." for i in range(9)]
        scores = small.score(texts)
        assert [s.token_ids for s in scores] == [small.encode(t) for t in texts]
        alone = small.score(texts[4])
        assert torch.allclose(torch.tensor(scores[4].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("params", "message"), [
    ({"max_new_tokens": 0}, "0 only to score the prompt"),
    ({"logprobs": 21}, "logprobs must be from 0 to 20"),
    ({"logprobs": -1}, "logprobs must be from 0 to 20"),
])
def test_bad_scoring_values_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_a_replayed_prompt_is_not_scored_twice():
    """Chunks of 3 over a 10-token prompt; the pipeline is lost after the second chunk and replays it."""
    policy = SchedulerPolicy(BlockAllocator(32, 4), _Tokenizer(), batching_window_s=0.0, prefill_chunk_tokens=3)
    prompt = list(range(100, 110))
    seq = policy.add(prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=True), now=0.0)
    asked: list[int] = []

    def run_one() -> list:
        (step,), _ = policy.schedule(now=1.0)
        p = step.sampling[0]
        asked.extend(p.targets)
        answer = SampledToken(7, None, tuple(ScoredToken(t, -float(t), ()) for t in p.targets))
        return step, policy.complete(step.id, [answer])

    run_one()
    run_one()
    policy.requeue_all()  # lost: everything goes into fresh blocks again, from the start
    outputs = []
    while not outputs:
        _, outputs = run_one()
    ((done_id, event),) = outputs
    assert done_id == seq and event.finish_reason is FinishReason.LENGTH
    assert asked == prompt[1:]  # each prompt token scored once, in order, across the replay
    assert [s.token_id for s in event.prompt_logprobs] == prompt[1:]

