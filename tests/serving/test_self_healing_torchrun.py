"""Under torchrun on one host: a killed worker comes back (its rank supervises it), a stream running across the
kill goes on with the text it would have had, and the cluster serves again, all without a person."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_helpers import HOST, free_port, free_ports, stop_group, wait_until

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).with_name("torchrun")
SERVE = Path(sys.executable).with_name("chatloop-serve")
BODY = {"model": "smollm2", "prompt": "Write a story about a lighthouse.", "max_tokens": 120, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def torchrun_server(smollm2_split, tmp_path_factory):
    logs = tmp_path_factory.mktemp("torchrun-healing")
    port = free_port()
    command = [str(TORCHRUN), "--nproc-per-node", "5", "--master-addr", HOST, "--master-port", str(free_port()),
               "--no-python", str(SERVE), f"model.partitions_dir={smollm2_split}", "cluster.num_workers=4",
               f"server.port={port}", f"worker.metrics_port={free_ports(4)}", "cluster.heartbeat_timeout_s=2",
               "log_level=INFO", f"hydra.run.dir={logs / 'run'}"]
    with open(logs / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: _healthy(url) or proc.poll() is not None, 240, message="torchrun cluster up")
        assert proc.poll() is None, (logs / "torchrun.log").read_text()[-4000:]
        yield url, logs / "torchrun.log"
    finally:
        stop_group(proc, signal.SIGTERM)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _pids(url: str) -> dict[str, int]:
    return {n["name"]: n["pid"] for n in httpx.get(f"{url}/v1/status", timeout=30).json()["nodes"][1:]}


def test_a_killed_worker_comes_back_under_torchrun_and_its_stream_goes_on(torchrun_server):
    url, log = torchrun_server
    want = httpx.post(f"{url}/v1/completions", json=BODY, timeout=120).json()["choices"][0]["text"]
    victim = _pids(url)["worker1"]
    pieces, killed = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            pieces.append(chunk["choices"][0]["text"])
            if len(pieces) == 10:
                os.kill(victim, signal.SIGKILL)
                killed = time.monotonic()
    assert killed is not None and "".join(pieces) == want, (log.read_text()[-3000:], "".join(pieces), want)
    wait_until(lambda: _healthy(url), 60, message="healthy again after the kill")
    back = _pids(url)["worker1"]
    assert back != victim  # the rank started a new worker process, torchrun saw nothing
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=120).json()["choices"][0]["text"] == want
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert "chatloop_recovery_seconds_count 1.0" in metrics and 'chatloop_cluster_state{state="serving"} 1.0' in metrics
