"""Three hosts (network namespaces), the documented launcher commands unchanged: the coordinator alone on host A,
two workers on B, two on C. The hostname resolves to 127.0.0.1 on every host (Debian's default), and no
GLOO_SOCKET_IFNAME or TP_SOCKET_IFNAME is set: each rank must find the interface that reaches the coordinator.
Then host C's cable is pulled in the middle of a stream: the coordinator waits cluster.recovery_timeout_s for
its workers, the stream ends with an error naming them, /health says 503 naming them; the cable goes back in
and the coordinator takes the stages back by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from netns import Hosts, can_make_namespaces

from chatloop import ChatLoop, load_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch" / "torchrun_multi_node.sh"
RPC_TIMEOUT_S = 8
RECOVERY_TIMEOUT_S = 10
HEARTBEAT_TIMEOUT_S = 2
PROMPT = "The capital of France is"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(can_make_namespaces()), reason=str(can_make_namespaces()))]


@pytest.fixture(scope="module")
def cluster(smollm2_split, tmp_path_factory):
    """(hosts, base URL, logs) of the documented three-host launch, torn down afterwards."""
    logs = tmp_path_factory.mktemp("three-hosts")
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", PARTITIONS_DIR=str(smollm2_split),
               CHATLOOP_OUTPUTS=str(logs / "outputs"), PYTHONUNBUFFERED="1")
    with Hosts(["a", "b", "c"]) as hosts:
        master = hosts.addresses["a"]
        procs = []
        for host, node_rank, procs_per_node in (("a", 0, 1), ("b", 1, 2), ("c", 2, 2)):
            # The README's commands, with this test's partitions and the HTTP port on A's address.
            launch_env = {**env, "NODE_RANK": str(node_rank), "NNODES": "3", "PROCS_PER_NODE": str(procs_per_node),
                          "MASTER_ADDR": master}
            command = [str(LAUNCHER), f"server.host={master}", f"cluster.rpc_timeout_s={RPC_TIMEOUT_S}",
                       "cluster.progress_deadline_s=4", f"cluster.recovery_timeout_s={RECOVERY_TIMEOUT_S}",
                       f"cluster.heartbeat_timeout_s={HEARTBEAT_TIMEOUT_S}", "log_level=WARNING"]
            with open(logs / f"{host}.log", "wb") as log:
                procs.append(subprocess.Popen(hosts.command(host, command), env=launch_env, cwd=ROOT, stdout=log,
                                              stderr=subprocess.STDOUT))
        url = f"http://{master}:8000"
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                tails = {h: (logs / f"{h}.log").read_text()[-2500:] for h in "abc"}
                pytest.fail(f"the three-host cluster did not come up: {json.dumps(tails, indent=1)}")
            time.sleep(1)
        try:
            yield hosts, url, logs
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_the_documented_launch_on_three_hosts_gives_the_one_process_text(cluster, smollm2_split):
    _, url, _ = cluster
    status = httpx.get(f"{url}/v1/status", timeout=30).json()
    assert [n["name"] for n in status["nodes"]] == ["coordinator", "worker0", "worker1", "worker2", "worker3"]
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    with ChatLoop.start(load_config(["cluster=single", f"model.partitions_dir={smollm2_split}",
                                     "cluster.num_workers=4", "cache.kv_cache_mb=32"])) as one_process:
        expected = one_process.generate(PROMPT, max_new_tokens=24, ignore_eos=True).text
    assert answer["choices"][0]["text"] == expected


def test_a_host_that_goes_away_is_named_and_taken_back_when_it_returns(cluster, smollm2_split):
    hosts, url, _ = cluster
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    events, pulled = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if len(events) == 5:
                hosts.link("c", up=False)
                pulled = time.monotonic()
            if events[-1] == "[DONE]":
                break
    failed_after = time.monotonic() - pulled
    error = json.loads(events[-2])["error"]
    assert "worker2" in error["message"] and "worker3" in error["message"], error
    assert "worker0" not in error["message"] and "worker1" not in error["message"]
    # Noticed within the heartbeat timeout; its requests waited cluster.recovery_timeout_s for the host.
    assert failed_after < HEARTBEAT_TIMEOUT_S + RECOVERY_TIMEOUT_S + 10, failed_after
    health = httpx.get(f"{url}/health", timeout=30)
    assert health.status_code == 503 and set(health.json()["down"]) == {"worker2", "worker3"}, health.text
    refused = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60)
    assert refused.status_code == 503 and "worker2" in refused.json()["error"]["message"]

    hosts.link("c", up=True)
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, httpx.get(f"{url}/health", timeout=30).text
        time.sleep(1)
    again = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(f"{url}/v1/completions", json=again, timeout=120)
    assert answer.status_code == 200, answer.text
    with ChatLoop.start(load_config(["cluster=single", f"model.partitions_dir={smollm2_split}",
                                     "cluster.num_workers=4", "cache.kv_cache_mb=32"])) as one_process:
        assert answer.json()["choices"][0]["text"] == one_process.generate(PROMPT, max_new_tokens=24,
                                                                           ignore_eos=True).text
