"""The HTTP API over the in-process pipeline (SmolLM2 in 4 stages, no RPC): one server for the module.

Concurrency, bad requests, disconnects, admission (429), API keys, metrics, status, OpenAPI.
The same routes over 4 RPC workers are in test_serving_rpc.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import replace

import httpx
import pytest
from serving_helpers import GREETING, scrape, serve_in_thread, wait_until

from chatloop import ChatLoop, load_config
from chatloop.serving import create_app
from chatloop.serving.status import main as status_main

MODEL = "smollm2"
PROMPTS = ["The capital of France is", "Water boils at", "One, two, three,", "My favourite food is"]
CHATS = [GREETING, [{"role": "user", "content": "Name a color."}]]
SHORT = 6


def _overrides(parts, *extra: str) -> list[str]:
    return ["cluster=single", "cluster.num_workers=4", f"model.partitions_dir={parts}", *extra]


@pytest.fixture(scope="module")
def llm(smollm2_split):
    # One micro-batch of up to 64 sequences at a time: the in-process stages run one after another anyway.
    overrides = _overrides(smollm2_split, "batching.max_batch_size=64", "cluster.max_in_flight=1")
    with ChatLoop.start(load_config(overrides)) as llm:
        yield llm


@pytest.fixture(scope="module")
def url(llm):
    with serve_in_thread(create_app(llm, llm.config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def expected(llm):
    """Greedy single-request answers from the Python API: ("completion"|"chat", index) -> Completion."""
    out = {("completion", i): llm.generate(p, max_new_tokens=SHORT) for i, p in enumerate(PROMPTS)}
    out.update({("chat", i): llm.chat(m, max_new_tokens=SHORT) for i, m in enumerate(CHATS)})
    return out


def _good(client: httpx.Client) -> None:
    """A small request that must work (after a bad one, the server keeps serving)."""
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def _sse(lines) -> list:
    """The data of each Server-Sent Event, JSON-decoded; the final '[DONE]' as the string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_completion_and_chat_match_the_python_api(client, expected):
    r = client.post("/v1/completions",
                    json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": SHORT, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected[("completion", 0)]
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == want.text
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]  # (the same prompt ran before: a hit)
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": want.completion_tokens,
                             "total_tokens": want.prompt_tokens + want.completion_tokens}
    assert 0 <= cached < want.prompt_tokens

    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHATS[0], "max_tokens": SHORT, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected[("chat", 0)].text}

    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHATS[0]]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": parts, "max_completion_tokens": SHORT})
    assert r.json()["choices"][0]["message"]["content"] == expected[("chat", 0)].text


def test_streamed_completion_is_openai_sse(client, expected):
    payload = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": SHORT, "stream": True,
               "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected[("completion", 1)].text
    assert chunks[-2]["choices"][0]["finish_reason"] == expected[("completion", 1)].finish_reason
    assert (chunks[-1]["choices"] == []
            and chunks[-1]["usage"]["completion_tokens"] == expected[("completion", 1)].completion_tokens)


def test_64_concurrent_clients_get_their_own_answers(url, expected):
    """64 clients at once (completions and a few chats, a quarter streamed): each answer equals its single-request
    answer."""

    async def one(http: httpx.AsyncClient, i: int) -> tuple[tuple[str, int], str, str]:
        kind = "chat" if i % 16 == 5 else "completion"  # chat prompts are long (a system prompt): keep them few
        k = i % (len(CHATS) if kind == "chat" else len(PROMPTS))
        stream = i % 4 == 3
        body = {"model": MODEL, "max_tokens": SHORT, "temperature": 0, "stream": stream}
        body.update({"messages": CHATS[k]} if kind == "chat" else {"prompt": PROMPTS[k]})
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        if not stream:
            r = await http.post(path, json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            return ((kind, k), choice["message"]["content"] if kind == "chat" else choice["text"],
                    choice["finish_reason"])
        async with http.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = _sse([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
        text = "".join((c["delta"].get("content") or "") if kind == "chat" else c["text"] for c in choices)
        return (kind, k), text, choices[-1]["finish_reason"]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    results = asyncio.run(run())
    assert len(results) == 64
    for key, text, finish in results:
        assert text == expected[key].text, key
        assert finish == expected[key].finish_reason, key


BAD_REQUESTS = [
    # (what, body (dict, or raw bytes), path, status, param)
    ("malformed JSON", b'{"model": "smollm2", "prompt": ', "/v1/completions", 400, None),
    ("a JSON list, not an object", b"[1, 2]", "/v1/completions", 400, None),
    ("unknown model", {"model": "gpt-4", "prompt": "Hi"}, "/v1/completions", 404, "model"),
    ("prompt longer than the context", {"model": MODEL, "prompt": "hi " * 9000}, "/v1/completions", 413, "prompt"),
    ("max_tokens 0", {"model": MODEL, "prompt": "Hi", "max_tokens": 0}, "/v1/completions", 400, "max_tokens"),
    ("max_tokens negative", {"model": MODEL, "messages": GREETING, "max_tokens": -3},
     "/v1/chat/completions", 400, "max_tokens"),
    ("max_tokens beyond the context", {"model": MODEL, "prompt": "Hi", "max_tokens": 100_000},
     "/v1/completions", 400, "max_tokens"),
    ("temperature negative", {"model": MODEL, "prompt": "Hi", "temperature": -1},
     "/v1/completions", 400, "temperature"),
    ("top_p above 1", {"model": MODEL, "messages": GREETING, "top_p": 1.5}, "/v1/chat/completions", 400, "top_p"),
    ("top_k negative", {"model": MODEL, "prompt": "Hi", "top_k": -1}, "/v1/completions", 400, "top_k"),
    ("n > 1", {"model": MODEL, "prompt": "Hi", "n": 2}, "/v1/completions", 400, "n"),
    ("five stop strings", {"model": MODEL, "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]},
     "/v1/completions", 400, "stop"),
    ("temperature as a string", {"model": MODEL, "prompt": "Hi", "temperature": "hot"},
     "/v1/completions", 400, "temperature"),
    ("max_tokens as a float", {"model": MODEL, "prompt": "Hi", "max_tokens": 2.5},
     "/v1/completions", 400, "max_tokens"),
    ("prompt as a number", {"model": MODEL, "prompt": 12}, "/v1/completions", 400, "prompt"),
    ("messages as a string", {"model": MODEL, "messages": "hello"}, "/v1/chat/completions", 400, "messages"),
    ("stream as a string", {"model": MODEL, "prompt": "Hi", "stream": "yes"}, "/v1/completions", 400, "stream"),
    ("messages missing", {"model": MODEL}, "/v1/chat/completions", 400, "messages"),
    ("messages empty", {"model": MODEL, "messages": []}, "/v1/chat/completions", 400, "messages"),
    ("token id outside the vocabulary", {"model": MODEL, "prompt": [1, 2, 10**9]}, "/v1/completions", 400, "prompt"),
    ("a batch of prompts", {"model": MODEL, "prompt": ["a", "b"]}, "/v1/completions", 400, "prompt"),
    ("logprobs above 5", {"model": MODEL, "prompt": "Hi", "logprobs": 6}, "/v1/completions", 400, "logprobs"),
    ("echo with stream", {"model": MODEL, "prompt": "Hi", "echo": True, "stream": True}, "/v1/completions", 400,
     "echo"),
    ("top_logprobs without logprobs", {"model": MODEL, "messages": GREETING, "top_logprobs": 2},
     "/v1/chat/completions", 400, "top_logprobs"),
    ("top_logprobs above 20", {"model": MODEL, "messages": GREETING, "logprobs": True, "top_logprobs": 21},
     "/v1/chat/completions", 400, "top_logprobs"),
    ("max_tokens 0 on chat", {"model": MODEL, "messages": GREETING, "max_tokens": 0}, "/v1/chat/completions", 400,
     "max_tokens"),
    ("an image part",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "/v1/chat/completions", 400, "messages.0.content"),
    ("a message without a role", {"model": MODEL, "messages": [{"content": "Hi"}]},
     "/v1/chat/completions", 400, "messages.0.role"),
    ("a bad streamed request", {"model": MODEL, "prompt": "Hi", "stream": True, "max_tokens": 0},
     "/v1/completions", 400, "max_tokens"),
    ("max_tokens 0 with echo but no logprobs", {"model": MODEL, "prompt": "Hi", "max_tokens": 0, "echo": True},
     "/v1/completions", 400, "max_tokens"),
    ("a suffix", {"model": MODEL, "prompt": "Hi", "suffix": "!"}, "/v1/completions", 400, "suffix"),
    ("a token id with a fraction", {"model": MODEL, "prompt": [1, 2.5]}, "/v1/completions", 400, "prompt.1"),
    ("max_completion_tokens beyond the context beside max_tokens",
     {"model": MODEL, "messages": GREETING, "max_tokens": 1, "max_completion_tokens": 100_000},
     "/v1/chat/completions", 400, "max_completion_tokens"),
    ("a content part without its type", {"model": MODEL, "messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
     "/v1/chat/completions", 400, "messages.0.content.0.type"),
]


@pytest.mark.parametrize("what,body,path,status,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(client, what, body, path, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["message"] and "Traceback" not in r.text
    _good(client)


def test_what_the_schema_allows_is_served(client):
    """JSON Schema's integer takes 2.0 and the schema lets suffix be empty: both are served (schemathesis found them
    refused)."""
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [2444.0, 28.0], "max_tokens": 2.0, "seed": 7.0,
                                              "suffix": "", "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
                                 "prompt_tokens_details": {"cached_tokens": 0}}  # (shorter than a block)


def test_unknown_routes_and_methods_answer_openai_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/models/gpt-4").status_code == 404
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def _kv(url: str) -> tuple[float, float, float]:
    m = scrape(f"{url}/metrics")
    return m["chatloop_kv_blocks_free"], m["chatloop_kv_blocks_capacity"], m["chatloop_sequences_running"]


def _blocks_all_free(url: str):
    free, capacity, running = _kv(url)
    return free == capacity and running == 0


def test_stream_disconnect_cancels_and_frees_blocks(client, url):
    cancelled = scrape(f"{url}/metrics").get('chatloop_sequences_finished_total{reason="cancelled"}', 0)
    payload = {"model": MODEL, "messages": GREETING, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=60) as own, own.stream("POST", "/v1/chat/completions", json=payload) as r:
        assert r.status_code == 200
        # Keep the line iterator: a `for ... break` drops it, and closing it closes the connection,
        # which the server then (rightly) sees as a disconnect before the check below.
        lines, events = r.iter_lines(), []
        while len(events) < 4:
            line = next(lines)
            if line.startswith("data: "):
                events.append(line)
        free, capacity, running = _kv(url)
        assert free < capacity and running == 1, (free, capacity, running, events)  # the stream holds its blocks
    # leaving the block closes the connection mid-stream
    wait_until(lambda: _blocks_all_free(url), 10, message="every KV block free after the disconnect")
    after = scrape(f"{url}/metrics")
    assert after['chatloop_sequences_finished_total{reason="cancelled"}'] == cancelled + 1
    assert after['chatloop_requests_total{endpoint="chat_completions",outcome="disconnected"}'] >= 1
    _good(client)


def test_non_streamed_disconnect_cancels_and_frees_blocks(client, url):
    payload = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=payload, timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: _blocks_all_free(url), 10, message="every KV block free after the client gave up")
    _good(client)


def test_metrics_parse_and_move(client, url):
    before = scrape(f"{url}/metrics")
    for name in ("chatloop_queue_depth", "chatloop_micro_batches_in_flight", "chatloop_micro_batch_size",
                 "chatloop_kv_blocks_used", "chatloop_kv_blocks_free", "chatloop_generated_tokens_total"):
        assert name in before, name
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 0})
    after = scrape(f"{url}/metrics")
    key = 'chatloop_requests_total{endpoint="completions",outcome="length"}'
    assert after[key] == before.get(key, 0) + 1
    invalid = 'chatloop_requests_total{endpoint="completions",outcome="invalid"}'
    assert after[invalid] == before.get(invalid, 0) + 1
    assert after["chatloop_generated_tokens_total"] >= before["chatloop_generated_tokens_total"] + 5
    assert after["chatloop_completion_tokens_total"] == before.get("chatloop_completion_tokens_total", 0) + 5
    assert after["chatloop_prompt_tokens_total"] > before.get("chatloop_prompt_tokens_total", 0)
    assert (after["chatloop_time_to_first_token_seconds_count"]
            == before.get("chatloop_time_to_first_token_seconds_count", 0) + 1)
    assert (after["chatloop_inter_token_latency_seconds_count"]
            == before.get("chatloop_inter_token_latency_seconds_count", 0) + 4)
    assert after['chatloop_request_duration_seconds_count{endpoint="completions"}'] >= 1
    assert after['chatloop_stage_up{stage="stage0"}'] == 1


def test_health_status_and_the_status_command(client, url, capsys):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    status = client.get("/v1/status").json()
    assert (status["healthy"]
            and [n["name"] for n in status["nodes"]] == ["coordinator", "stage0", "stage1", "stage2", "stage3"])
    assert status["nodes"][1]["partition"] == "partition_0.safetensors"
    assert status_main(["--url", url]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("NAME"))
    assert header.split() == ["NAME", "ROLE/RANK", "HOST", "PORTS", "LAYERS", "PARTITION", "MEMORY", "STATUS"]
    assert "coordinator/0" in out and "stage3" in out and "serving" in out
    coordinator = next(line for line in out.splitlines() if line.startswith("coordinator"))
    assert "http " in coordinator and " up " in coordinator
    assert status_main(["--url", url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["nodes"][0]["ports"] == {"http": int(url.rsplit(":", 1)[1])}  # in process: no store
    assert status_main(["--url", "http://127.0.0.1:9"]) == 2


def test_status_shows_the_prefix_cache_and_speculation_as_metrics_count_them(client, url, capsys):
    """Two requests sharing a long prefix: the status page's hit rate is /metrics' hits / queries and above 0; a
    request that speculates (ngram over a prompt that repeats itself) shows speculation's figures the same way."""
    prefix = "The quick brown fox jumps over the lazy dog. " * 12  # ~120 tokens: several full 16-token blocks
    hits_before = scrape(f"{url}/metrics").get("chatloop_prefix_cache_hits_tokens_total", 0)
    for ending in ("Then it", "After that, the dog"):
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prefix + ending, "max_tokens": 2})
        assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prefix, "max_tokens": 12, "ignore_eos": True,
                                             "speculative_method": "ngram"})
    assert r.status_code == 200, r.text
    m = scrape(f"{url}/metrics")  # (no request in between: the server is idle between this and the status below)
    status = client.get("/v1/status").json()
    cache, speculation = status["cache"], status["speculation"]
    assert m["chatloop_prefix_cache_hits_tokens_total"] > hits_before
    assert cache["prefix_cache_hits_tokens"] == m["chatloop_prefix_cache_hits_tokens_total"]
    assert cache["prefix_cache_queries_tokens"] == m["chatloop_prefix_cache_queries_tokens_total"]
    assert cache["prefix_cache_hit_rate"] > 0
    assert cache["prefix_cache_hit_rate"] == pytest.approx(
        m["chatloop_prefix_cache_hits_tokens_total"] / m["chatloop_prefix_cache_queries_tokens_total"])
    assert (cache["kv_blocks_used"], cache["kv_blocks_cached"], cache["kv_blocks_free"], cache["kv_blocks_total"]) == (
        m["chatloop_kv_blocks_used"], m["chatloop_kv_blocks_cached"], m["chatloop_kv_blocks_free"],
        m["chatloop_kv_blocks_capacity"])
    assert cache["kv_blocks_cached"] > 0  # the shared prompt's blocks stay after its requests ended
    drafted = m["chatloop_speculative_drafted_tokens_total"]
    assert drafted > 0 and speculation["method"] is None  # the server's speculative.method is null; the request asked
    assert speculation["drafted_tokens"] == drafted
    assert speculation["accepted_tokens"] == m["chatloop_speculative_accepted_tokens_total"]
    assert speculation["acceptance_rate"] == pytest.approx(m["chatloop_speculative_accepted_tokens_total"] / drafted)
    assert status_main(["--url", url]) == 0
    out = capsys.readouterr().out
    hits, queries = int(cache["prefix_cache_hits_tokens"]), int(cache["prefix_cache_queries_tokens"])
    assert f"prefix cache: {hits} of {queries} tokens hit ({100 * hits / queries:.1f}%)" in out
    assert f"{cache['kv_blocks_cached']} cached" in out and "speculation: " in out and "drafted tokens accepted" in out


def test_status_says_when_the_caches_have_no_figures_yet():
    """Before any lookup or draft the rates are None and the table says so (no division by zero); speculation
    configured but not yet used shows, speculation off and unused does not."""
    from chatloop.engine import EngineStats
    from chatloop.serving.health import HealthReport
    from chatloop.serving.status import build_status, format_cache

    stats = EngineStats(num_waiting=0, num_running=0, num_in_flight=0, last_batch_size=0, generated_tokens=0,
                        kv_blocks_total=8, kv_blocks_free=8)
    report = HealthReport(stages=[], checked_at=0.0)
    off = build_status(stats, report, model="m")
    assert off["speculation"] is None and off["cache"]["prefix_cache_hit_rate"] is None
    assert format_cache(off) == "KV cache: 0 blocks used, 0 cached, 8 free of 8\nprefix cache: no lookups yet"
    on = build_status(stats, report, model="m", speculative_method="ngram")
    assert on["speculation"] == {"method": "ngram", "drafted_tokens": 0, "accepted_tokens": 0, "acceptance_rate": None}
    assert format_cache(on).endswith("speculation (ngram): no drafts yet")


def test_openapi_schema_is_published(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/status", "/health", "/metrics"):
        assert path in schema["paths"], path
    assert "CompletionRequest" in schema["components"]["schemas"]


def test_openapi_declares_bearer_auth_only_when_a_key_is_set(client, llm, tmp_path):
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})
    key_file = tmp_path / "key"
    key_file.write_text("sekrit\n")
    cfg = replace(llm.config, server=replace(llm.config.server, api_key_file=str(key_file)))
    with serve_in_thread(create_app(llm, cfg)) as url:
        schema = httpx.get(f"{url}/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert "401" in schema["paths"]["/v1/completions"]["post"]["responses"]


@pytest.mark.parametrize("source", ["file", "environment"])
def test_api_key_is_required_when_set(llm, tmp_path, monkeypatch, source):
    if source == "file":
        (tmp_path / "key").write_text("sekrit\n")
        cfg = replace(llm.config, server=replace(llm.config.server, api_key_file=str(tmp_path / "key")))
    else:
        monkeypatch.setenv("CHATLOOP_API_KEY", "sekrit")
        cfg = llm.config
    with serve_in_thread(create_app(llm, cfg)) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic c2Vrcml0"}):
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"}, timeout=60)
        assert r.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # probes and scrapers need no key
        assert httpx.get(f"{url}/metrics").status_code == 200
        monkeypatch.delenv("CHATLOOP_API_KEY", raising=False)
        assert status_main(["--url", url]) == 2
        assert status_main(["--url", url, "--api-key", "sekrit"]) == 0


def test_a_key_file_that_gives_no_key_is_refused(llm, tmp_path):
    for content, message in [(None, "cannot read it"), ("", "is empty: write the key on its first line")]:
        path = tmp_path / "key"
        if content is not None:
            path.write_text(content)
        cfg = replace(llm.config, server=replace(llm.config.server, api_key_file=str(path)))
        with pytest.raises(ValueError, match=message):
            create_app(llm, cfg)


def test_full_queue_answers_429_and_admitted_requests_complete(smollm2_split):
    """max_batch_size=1, max_queue_size=2: of 12 simultaneous requests a few run, the rest get 429 at once."""
    cfg = load_config(_overrides(smollm2_split, "batching.max_queue_size=2", "batching.max_batch_size=1"))
    with ChatLoop.start(cfg) as small:
        want = small.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).text
        with serve_in_thread(create_app(small, cfg)) as url:
            results: list[httpx.Response | str] = [None] * 12  # type: ignore[list-item]
            start = threading.Barrier(12)
            clients = [httpx.Client(base_url=url, timeout=120) for _ in range(12)]

            def one(i: int) -> None:
                body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "ignore_eos": True, "stream": i % 2 == 1}
                start.wait()
                with clients[i] as http, http.stream("POST", "/v1/completions", json=body) as r:
                    r.read()
                    if r.status_code == 200 and body["stream"]:
                        events = _sse(r.text.splitlines())
                        results[i] = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
                    else:
                        results[i] = r

            threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            refused = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 429]
            answered = [r if isinstance(r, str) else r.json()["choices"][0]["text"] for r in results
                        if isinstance(r, str) or r.status_code == 200]
            assert len(refused) + len(answered) == 12
            assert refused, "no request was refused"
            assert len(answered) >= 3  # one running and two waiting at least
            assert all(text == want for text in answered)
            for r in refused:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
            m = scrape(f"{url}/metrics")
            assert m['chatloop_requests_total{endpoint="completions",outcome="queue_full"}'] == len(refused)
            assert m["chatloop_queue_capacity"] == 2
            r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200


def test_health_answers_fast_while_a_10_mb_prompt_is_refused(client, url):
    huge = json.dumps({"model": MODEL, "prompt": "lorem ipsum " * (10 * 2**20 // 12), "max_tokens": 4}).encode()
    headers = {"Content-Type": "application/json"}
    outcome: dict = {}

    def send() -> None:
        started = time.monotonic()
        outcome["response"] = httpx.post(f"{url}/v1/completions", content=huge, headers=headers, timeout=60)
        outcome["seconds"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()
    probes = []
    while sender.is_alive() or len(probes) < 5:
        started = time.monotonic()
        assert client.get("/health").status_code == 200
        probes.append(time.monotonic() - started)
    sender.join()
    r = outcome["response"]
    assert r.status_code == 413 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert "no prompt that fits the model's context is that long" in r.json()["error"]["message"]
    # Alone, the refusal takes 0.04-0.05 s and no probe over 0.011 s; in the whole suite's process (its heap and
    # threads after ~1,400 tests; the server runs in it) the refusal took 0.31 s and one probe 0.126 s, twice.
    # Tokenizing 10 MB on the event loop would hold it for seconds.
    assert outcome["seconds"] < 5 and max(probes) < 0.25, (outcome, probes)
    # Under the body bound, text that cannot fit is refused before it is tokenized (off the event loop anyway).
    chars = 6 * 2**20 // 7
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * chars, "max_tokens": 1})
    assert r.status_code == 413 and f"the prompt has {chars} characters" in r.json()["error"]["message"], r.text


def test_a_body_over_the_limit_is_refused_before_it_is_read(llm):
    cfg = replace(llm.config, server=replace(llm.config.server, max_request_mb=1))
    with serve_in_thread(create_app(llm, cfg)) as url:
        body = json.dumps({"model": MODEL, "prompt": "x" * (2 * 2**20), "max_tokens": 1})
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "server.max_request_mb (1 MiB)" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(3):
                yield b" " * 2**20
            yield body.encode()

        r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413


@pytest.mark.parametrize("poison", [
    {"temperature": 1e-45}, {"temperature": 1.0, "top_p": 1e-300}, {"repetition_penalty": 1e-45},
])
def test_extreme_sampling_values_hurt_no_one_batched_with_them(url, expected, poison):
    """Each value that once failed every request sharing its micro-batch, sent at the same moment as six others."""
    normal = [{"model": MODEL, "prompt": PROMPTS[i % 4], "max_tokens": SHORT} for i in range(6)]
    bodies = [{"model": MODEL, "prompt": PROMPTS[0], "max_tokens": SHORT, **poison}, *normal]
    start = threading.Barrier(len(bodies))
    answers: list = [None] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as own:
            start.wait()
            answers[i] = own.post("/v1/completions", json=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, r in enumerate(answers[1:]):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[("completion", i % 4)].text
    poisoned = answers[0]
    if "repetition_penalty" in poison:  # outside the stated bounds: refused up front
        assert poisoned.status_code == 400 and poisoned.json()["error"]["param"] == "repetition_penalty"
    else:  # inside them: sampled safely (a temperature that small is greedy; top-p keeps the likeliest token)
        assert poisoned.status_code == 200, poisoned.text
