"""The reference deployment in real containers: one image, a coordinator and four worker containers started
with launch/docker-run.sh (as the compose file starts them), on a private network.

Runs with podman and runc (``launch/container-base.sh`` installs them and makes a Debian base image without a
registry; CI runs it first). Skipped, saying why, where podman or the base image is missing or not permitted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "launch" / "docker-run.sh"
BASE = os.environ.get("CHATLOOP_TEST_BASE_IMAGE", "localhost/debian-py:bookworm")
PREFIX = "chatloop-test"
IMAGE = "localhost/chatloop-all-in-one:test"
pytestmark = pytest.mark.slow


def _podman_problem() -> str | None:
    if not (shutil.which("podman") and shutil.which("runc")):
        return "podman and runc are not installed (launch/container-base.sh installs them, as root)"
    info = subprocess.run(["podman", "--runtime", "runc", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"podman is not permitted here: {info.stderr.strip()[-300:]}"
    if subprocess.run(["podman", "image", "exists", BASE]).returncode != 0:
        return f"no base image {BASE} (launch/container-base.sh makes it, or set CHATLOOP_TEST_BASE_IMAGE)"
    return None


def _free_block(n: int) -> int:
    """The first of ``n`` consecutive free TCP ports on this host."""
    for first in range(20000, 60000, 97):
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


@pytest.fixture(scope="module")
def deployment():
    problem = _podman_problem()
    if problem:
        pytest.skip(problem)
    http_port, metrics_port = _free_block(1), _free_block(4)
    while metrics_port <= http_port < metrics_port + 4:
        metrics_port = _free_block(8) + 4
    base_env = {**os.environ, "DOCKER": "podman --runtime runc", "IMAGE": IMAGE,
           "NETWORK": PREFIX, "PREFIX": PREFIX, "HTTP_PORT": str(http_port), "METRICS_PORT": str(metrics_port)}
    pip_args = subprocess.run([sys.executable, str(ROOT / "launch" / "pip_build_args.py")], capture_output=True,
                              text=True, check=True).stdout.strip()
    base_env["BUILD_ARGS"] = f"{pip_args} --build-arg BASE={BASE}"

    def run(*verb: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(RUN), *verb], env={**base_env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    built = run("build", timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    url = f"http://127.0.0.1:{http_port}"
    try:
        run("stop")
        for verb in (["run-coordinator"], *(["run-worker", str(n)] for n in range(4))):
            started = run(*verb)
            assert started.returncode == 0, started.stderr
        _wait_ready(url, 300)
        yield {"url": url, "metrics": [metrics_port + n for n in range(4)], "run": run}
    finally:
        logs = subprocess.run(["podman", "logs", "--tail", "30", f"{PREFIX}-coordinator"], capture_output=True,
                              text=True).stderr
        print(logs)  # shown by pytest when a test failed
        run("stop")
        subprocess.run(["podman", "network", "rm", "-f", PREFIX], capture_output=True)
        # The next build of the tag would leave this one dangling: 2.9 GB a run, which filled CI's disk.
        subprocess.run(["podman", "rmi", "-f", IMAGE], capture_output=True)


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"the coordinator at {url} did not become healthy within {timeout} s")


def _ask(url: str) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    return answer.choices[0].message.content


def _micro_batches(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {s.labels["stage"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "chatloop_stage_micro_batches_total"}


def test_a_chat_answer_over_http_through_four_worker_containers(deployment):
    assert "Paris" in _ask(deployment["url"])


def test_each_worker_container_publishes_its_metrics(deployment):
    _ask(deployment["url"])
    for k, port in enumerate(deployment["metrics"]):
        counts = _micro_batches(port)
        assert counts.get(f"worker{k}", 0) > 0, (port, counts)


def test_the_status_command_lists_every_container_and_stage(deployment):
    shown = deployment["run"]("status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    table = shown.stdout
    for name in ("coordinator", *(f"worker-{k}" for k in range(4))):
        assert f"{PREFIX}-{name}" in table
    for layers in ("0-7", "8-15", "16-22", "23-29"):
        assert f" {layers} " in table, table
    as_json = json.loads(deployment["run"]("status", "--json").stdout.split("\n\n", 1)[1])
    stages = [n for n in as_json["nodes"] if n["role"] == "worker"]
    assert [n["state"] for n in stages] == ["up"] * 4, stages


def test_a_worker_health_endpoint_answers_inside_its_container(deployment):
    probe = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:50052/health', timeout=5).read().decode())"
    out = subprocess.run(["podman", "exec", f"{PREFIX}-worker-1", "python", "-c", probe], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["stage_loaded"] is True


def test_a_killed_worker_container_restarts_and_the_service_answers_again(deployment):
    name = f"{PREFIX}-worker-2"
    pid = subprocess.run(["podman", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True,
                         check=True).stdout.strip()
    os.kill(int(pid), 9)
    assert "Paris" in _ask(deployment["url"])  # waits for the restart and the new generation
    restarted = subprocess.run(["podman", "inspect", "-f", "{{.RestartCount}} {{.State.Pid}}", name],
                               capture_output=True, text=True, check=True).stdout.split()
    assert restarted[1] != pid, "the worker container was not restarted"
    assert _micro_batches(deployment["metrics"][2])


def test_the_stages_know_they_share_one_machine_and_take_turns(deployment):
    """Five containers have five hostnames but one kernel: kept apart by hostname they computed four stages at
    once on this host's cores, 15x slower than the same workers outside containers."""
    status = json.loads(deployment["run"]("status", "--json").stdout.split("\n\n", 1)[1])
    workers = [n for n in status["nodes"] if n["role"] == "worker"]
    assert len({n["host"] for n in workers}) == 4, workers  # a hostname each...
    assert len({n["machine"] for n in workers}) == 1, workers  # ...one machine
    assert status["nodes"][0]["max_in_flight"] == 1, status["nodes"][0]
    assert {n["omp_spin_count"] for n in workers} == {"20000"}, workers  # the config's, not libgomp's default


def test_ports_are_published_on_loopback_only(deployment):
    for name in ("coordinator", *(f"worker-{k}" for k in range(4))):
        ports = subprocess.run(["podman", "port", f"{PREFIX}-{name}"], capture_output=True, text=True,
                               check=True).stdout.split()
        bound = [p for p in ports if ":" in p]
        assert bound and all(p.startswith("127.0.0.1:") for p in bound), (name, ports)


def test_publishing_beyond_loopback_needs_an_api_key(deployment):
    refused = deployment["run"]("run-coordinator", env={"PUBLISH_ADDR": "0.0.0.0", "PREFIX": f"{PREFIX}-open"})
    assert refused.returncode != 0
    assert "CHATLOOP_API_KEY" in refused.stderr and "PUBLISH_ADDR=127.0.0.1" in refused.stderr, refused.stderr
    made = subprocess.run(["podman", "ps", "-aq", "--filter", f"name=^{PREFIX}-open-"], capture_output=True,
                          text=True).stdout.strip()
    assert made == "", "a container was created though the script refused"


def test_a_worker_container_stopped_by_hand_is_named_with_the_command_that_brings_it_back(deployment):
    name = f"{PREFIX}-worker-3"
    subprocess.run(["podman", "stop", "-t", "2", name], capture_output=True, check=True)
    deadline, body = time.monotonic() + 60, ""
    while time.monotonic() < deadline and f"start {name}" not in body:
        time.sleep(1)
        answer = httpx.get(f"{deployment['url']}/health", timeout=10)
        body = answer.text if answer.status_code == 503 else ""
    assert f"start {name}" in body and name in body, body
    shown = deployment["run"]("status")
    assert f"start {name}" in shown.stdout, shown.stdout
    subprocess.run(["podman", "start", name], capture_output=True, check=True)
    _wait_ready(deployment["url"], 180)
    assert "Paris" in _ask(deployment["url"])


def test_sigterm_ends_the_coordinator_container_within_3_s(deployment):
    """``docker stop`` sends SIGTERM, then SIGKILL after the timeout (exit status 137): the service must be gone
    before that."""
    name = f"{PREFIX}-coordinator"
    started = time.monotonic()
    subprocess.run(["podman", "stop", "-t", "3", name], capture_output=True, check=True)
    took = time.monotonic() - started
    code = subprocess.run(["podman", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert code != "137", f"the coordinator did not exit within 3 s of SIGTERM (killed after {took:.1f} s)"
