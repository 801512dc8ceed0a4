"""A worker killed with SIGKILL while a stream is running, without self-healing: errors that name it, fast, and a
coordinator that stays up (with self-healing the worker is replaced: test_self_healing.py).

The cluster runs in a ``chatloop-serve`` subprocess (its own session, so that a hung RPC
shutdown can never reach the pytest process); it and its workers are killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import GREETING, HOST, free_port, free_ports, scrape, wait_until

from chatloop.serving.status import main as status_main

RPC_TIMEOUT_S = 5
VICTIM = "worker2"  # a middle stage: its death must travel back through worker1 and worker0

pytestmark = pytest.mark.slow


def _serve_command() -> list[str]:
    script = Path(sys.executable).with_name("chatloop-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "chatloop.serving.app"]


def _kill_group(proc: subprocess.Popen, pids: list[int]) -> None:
    """SIGKILL the server's session and any worker that escaped it."""
    for target in [proc.pid, *pids]:
        try:
            os.killpg(target, signal.SIGKILL) if target == proc.pid else os.kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


@pytest.fixture(scope="module")
def server(smollm2_split, tmp_path_factory):
    """(process, base URL, worker pids by name, log path) of a chatloop-serve with 4 workers."""
    logs = tmp_path_factory.mktemp("dead-worker")
    port = free_port()
    command = _serve_command() + [
        f"model.partitions_dir={smollm2_split}", "cluster.num_workers=4", f"cluster.master_addr={HOST}",
        f"cluster.master_port={free_port()}", f"cluster.rpc_timeout_s={RPC_TIMEOUT_S}", f"server.host={HOST}",
        "cluster.self_healing=false",
        f"server.port={port}", f"worker.metrics_port={free_ports(4)}", "log_level=WARNING",
    ]
    log_path = logs / "serve.log"
    env = {**os.environ, "CHATLOOP_OUTPUTS": str(logs / "outputs"), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{HOST}:{port}"
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chatloop-serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"chatloop-serve did not become healthy in 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        status = httpx.get(f"{url}/v1/status", timeout=30).json()
        pids = {n["name"]: n["pid"] for n in status["nodes"][1:]}
        yield proc, url, pids, log_path
    finally:
        _kill_group(proc, list(pids.values()))


def test_killed_worker_ends_the_stream_and_new_requests_get_503(server):
    proc, url, pids, log_path = server
    payload = {"model": "smollm2", "messages": GREETING, "max_tokens": 400, "ignore_eos": True, "stream": True}
    events = []
    killed_at = None
    plain: list[httpx.Response] = []  # a non-streamed request in flight at the same time
    plain_body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    in_flight = threading.Thread(target=lambda: plain.append(
        httpx.post(f"{url}/v1/completions", json=plain_body, timeout=RPC_TIMEOUT_S + 20)))
    with httpx.Client(base_url=url, timeout=httpx.Timeout(RPC_TIMEOUT_S + 20)) as client:
        in_flight.start()
        with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                if len(events) == 4 and killed_at is None:
                    os.kill(pids[VICTIM], signal.SIGKILL)
                    killed_at = time.monotonic()
        ended_after = time.monotonic() - killed_at

        # The stream ended with an error event naming the stage, then [DONE], within the RPC timeout.
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert VICTIM in error["message"] and error["type"] == "service_unavailable", error
        assert ended_after < RPC_TIMEOUT_S + 5, ended_after
        assert not any("error" in e for e in events[:-2] if isinstance(e, dict))
        in_flight.join(RPC_TIMEOUT_S + 5)
        assert not in_flight.is_alive(), "the non-streamed request still waits"
        assert plain[0].status_code == 503 and VICTIM in plain[0].json()["error"]["message"], plain[0].text

        # /health says 503 and names the stage.
        health = wait_until(lambda: (h := client.get("/health")).status_code == 503 and h, RPC_TIMEOUT_S,
                            message="/health 503")
        assert health.json()["down"] == [VICTIM]

        # New requests, plain and streamed, get a 503 naming the stage at once.
        started = time.monotonic()
        r = client.post("/v1/completions", json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 503, r.text
        assert VICTIM in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={**payload, "max_tokens": 4})
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
        assert VICTIM in r.json()["error"]["message"]
        assert time.monotonic() - started < 5

        # The coordinator stays up and reports the dead stage everywhere.
        status = client.get("/v1/status").json()
        assert not status["healthy"]
        assert {n["name"]: n["state"] for n in status["nodes"][1:]}[VICTIM] == "down"
        assert status_main(["--url", url]) == 1
        metrics = scrape(f"{url}/metrics")
        assert metrics[f'chatloop_stage_up{{stage="{VICTIM}"}}'] == 0
        assert metrics['chatloop_requests_total{endpoint="completions",outcome="unavailable"}'] >= 1
        assert metrics["chatloop_kv_blocks_free"] == metrics["chatloop_kv_blocks_capacity"]
    assert proc.poll() is None, log_path.read_text()[-4000:]


def test_server_stops_on_sigterm_with_a_dead_worker(server):
    """Nothing hangs: SIGTERM stops the coordinator and its remaining workers in bounded time."""
    proc, _url, pids, log_path = server
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chatloop-serve did not stop within 60 s of SIGTERM:\n{log_path.read_text()[-4000:]}")

    def workers_gone() -> bool:
        import psutil

        alive = [p for p in pids.values()
                 if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        return not alive

    wait_until(workers_gone, 15, message="every worker process gone")
