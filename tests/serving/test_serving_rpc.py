"""The HTTP API over a real cluster: SmolLM2 split over 4 RPC worker processes, one cluster for the module.

The official ``openai`` client gets the same text as the Python API; /health, /v1/status,
chatloop-status and every worker's own Prometheus endpoint see the four workers.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving_helpers import GREETING, free_port, free_ports, scrape, serve_in_thread

from chatloop import ChatLoop, load_config
from chatloop.serving import create_app
from chatloop.serving.status import main as status_main

MODEL = "smollm2"
NUM_WORKERS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(smollm2_split):
    """(llm, base URL, first worker metrics port) of a 4-worker cluster on loopback with free ports."""
    metrics_base = free_ports(NUM_WORKERS)
    cfg = load_config([
        f"model.partitions_dir={smollm2_split}", f"cluster.num_workers={NUM_WORKERS}", "cluster.master_addr=127.0.0.1",
        f"cluster.master_port={free_port()}", f"worker.metrics_port={metrics_base}", "cluster.rpc_timeout_s=60",
    ])
    with ChatLoop.start(cfg) as llm, serve_in_thread(create_app(llm, cfg)) as url:
        yield llm, url, metrics_base


def test_openai_client_gets_the_python_api_text(cluster):
    from openai import OpenAI

    llm, url, _ = cluster
    client = OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL]

    prompt = "The capital of France is"
    want = llm.generate(prompt, max_new_tokens=12, temperature=0)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)

    want = llm.chat(GREETING, max_new_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=GREETING, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens


def test_concurrent_clients_over_rpc(cluster):
    """16 clients at once keep several micro-batches in flight through the 4 workers; each gets its own answer."""
    llm, url, _ = cluster
    prompts = ["Water boils at", "One, two, three,", "The capital of Italy is", "My favourite food is"]
    want = {p: llm.generate(p, max_new_tokens=6).text for p in prompts}

    def one(i: int) -> tuple[str, str]:
        prompt = prompts[i % len(prompts)]
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 6}, timeout=120)
        assert r.status_code == 200, r.text
        return prompt, r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(text == want[prompt] for prompt, text in results)


def test_health_status_and_worker_metrics(cluster, capsys):
    _llm, url, metrics_base = cluster
    r = httpx.get(f"{url}/health", timeout=30)
    assert r.status_code == 200, r.text
    assert (r.json()["down"] == []
            and [s["name"] for s in r.json()["stages"]] == [f"worker{k}" for k in range(NUM_WORKERS)])

    status = httpx.get(f"{url}/v1/status", timeout=30).json()
    workers = status["nodes"][1:]
    assert [(w["name"], w["role"], w["rank"], w["state"]) for w in workers] == [
        (f"worker{k}", "worker", k + 1, "up") for k in range(NUM_WORKERS)
    ]
    pids = {w["pid"] for w in workers}
    assert len(pids) == NUM_WORKERS and os.getpid() not in pids
    assert all(w["rss_bytes"] > 0 and w["partition"] == f"partition_{k}.safetensors" for k, w in enumerate(workers))
    assert status_main(["--url", url]) == 0
    table = capsys.readouterr().out
    for k in range(NUM_WORKERS):
        assert f"worker{k}" in table and f"worker/{k + 1}" in table

    worker_urls = [f"http://127.0.0.1:{metrics_base + k}/metrics" for k in range(NUM_WORKERS)]
    before = [scrape(u) for u in worker_urls]
    coordinator_before = scrape(f"{url}/metrics")
    r = httpx.post(f"{url}/v1/completions",
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    after = [scrape(u) for u in worker_urls]
    for k, (b, a) in enumerate(zip(before, after)):
        label = f'{{stage="worker{k}"}}'
        assert a[f"chatloop_stage_micro_batches_total{label}"] >= b[f"chatloop_stage_micro_batches_total{label}"] + 4
        assert (a[f"chatloop_stage_compute_seconds_count{label}"]
                >= b[f"chatloop_stage_compute_seconds_count{label}"] + 4)
        assert a[f"chatloop_stage_received_bytes_total{label}"] > b[f"chatloop_stage_received_bytes_total{label}"]
        assert a[f"chatloop_stage_sent_bytes_total{label}"] > b[f"chatloop_stage_sent_bytes_total{label}"]
        assert a[f"chatloop_stage_busy_seconds_total{label}"] > b[f"chatloop_stage_busy_seconds_total{label}"]
        assert a[f"chatloop_stage_resident_memory_bytes{label}"] > 0
        assert 0 <= a[f"chatloop_stage_idle_ratio{label}"] <= 1
        if k < NUM_WORKERS - 1:  # the last stage forwards nothing
            assert (a[f"chatloop_stage_downstream_seconds_count{label}"]
                    >= b[f"chatloop_stage_downstream_seconds_count{label}"] + 4)
    coordinator = scrape(f"{url}/metrics")
    assert coordinator["chatloop_generated_tokens_total"] >= coordinator_before["chatloop_generated_tokens_total"] + 4
    assert all(coordinator[f'chatloop_stage_up{{stage="worker{k}"}}'] == 1 for k in range(NUM_WORKERS))


def test_a_stage_failure_mid_stream_ends_it_with_an_error_event_and_the_server_goes_on(cluster):
    """A stage that raises (an injected bug, the worker stays alive): the stream ends with an error naming it."""
    llm, url, _ = cluster
    payload = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    events = []
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=payload) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    events.append(data if data == "[DONE]" else json.loads(data))
                    if len(events) == 2:
                        llm.pipeline.inject_failure(1)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert "worker1" in error["message"] and error["code"] == "stage_unavailable", error
        assert "Traceback" not in error["message"]
        assert client.get("/health").status_code == 200  # the worker still answers
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        m = scrape(f"{url}/metrics")
        assert m["chatloop_kv_blocks_free"] == m["chatloop_kv_blocks_capacity"]
