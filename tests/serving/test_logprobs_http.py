"""Log-probabilities over HTTP, read with the real ``openai`` client: scoring a prompt the way lm-evaluation-harness's
local-completions model does (echo, max_tokens 0, logprobs), generated tokens' logprobs, chat logprobs, streams."""

from __future__ import annotations

import math

import pytest
from serving_helpers import serve_in_thread

from chatloop.serving import create_app

MODEL = "smollm2"
CONTEXT = "Question: What is the capital of France?\nAnswer:"
CONTINUATION = " Paris"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(llm):
    from openai import OpenAI

    with serve_in_thread(create_app(llm, llm.config)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_prompt_is_scored_as_lm_evaluation_harness_asks(client, llm):
    context_ids, whole_ids = llm.encode(CONTEXT), llm.encode(CONTEXT + CONTINUATION)
    assert whole_ids[:len(context_ids)] == context_ids
    answer = client.completions.create(model=MODEL, prompt=[whole_ids], max_tokens=0, echo=True, logprobs=1,
                                       temperature=0, seed=1234)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert choice.text == CONTEXT + CONTINUATION and choice.finish_reason == "length"
    assert len(lp.tokens) == len(whole_ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == CONTEXT + CONTINUATION
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    expected = llm.score(whole_ids)
    assert lp.token_logprobs[1:] == pytest.approx(expected.logprobs, abs=1e-6)
    # lm-evaluation-harness's parse: the continuation's log-likelihood, and whether greedy decoding gives it.
    continuation = lp.token_logprobs[len(context_ids):]
    greedy = all(t == max(top.values()) for t, top in zip(continuation, lp.top_logprobs[len(context_ids):]))
    assert math.fsum(continuation) == pytest.approx(math.fsum(expected.logprobs[len(context_ids) - 1:]), abs=1e-5)
    wanted = whole_ids[len(context_ids):]
    assert greedy == (llm.generate(context_ids, max_new_tokens=len(wanted), ignore_eos=True).token_ids == wanted)
    assert answer.usage.prompt_tokens == len(whole_ids) and answer.usage.completion_tokens == 0


def test_echo_without_logprobs_returns_the_prompt_and_the_completion(client, llm):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, temperature=0)
    completion = llm.generate(PROMPT, max_new_tokens=4)
    assert completion.text and answer.choices[0].text == PROMPT + completion.text
    assert answer.choices[0].logprobs is None


def test_generated_tokens_come_with_their_logprobs_and_alternatives(client, llm):
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    lp = answer.choices[0].logprobs
    reference = llm.generate(PROMPT, max_new_tokens=5, logprobs=3, ignore_eos=True)
    assert len(lp.tokens) == len(reference.token_ids) == 5
    assert "".join(lp.tokens) == answer.choices[0].text == reference.text
    assert lp.token_logprobs == pytest.approx([s.logprob for s in reference.logprobs], abs=1e-6)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy: the most likely token


def test_chat_logprobs_and_the_stream_agree(client):
    messages = [{"role": "user", "content": "Name a fruit that is yellow."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    text = answer.choices[0].message.content
    assert content and answer.usage.completion_tokens == len(content)
    if answer.choices[0].finish_reason == "length":
        assert b"".join(bytes(t.bytes) for t in content).decode() == text
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [t.token for t in streamed] == [t.token for t in content]
    # The second request finds the prompt's full blocks in the prefix cache and computes only its last tokens: the
    # same sums in smaller matmuls, a few 1e-6 apart (2.6e-6 seen).
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=5e-5)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text


def test_a_streamed_completion_carries_logprobs_with_running_offsets(client):
    offsets, tokens = [], []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=0, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            offsets.extend(chunk.choices[0].logprobs.text_offset)
            tokens.extend(chunk.choices[0].logprobs.tokens)
    assert len(tokens) == 6
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
