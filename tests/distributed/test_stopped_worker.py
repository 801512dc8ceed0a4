"""Workers started by themselves (``chatloop-worker --config``, as in the reference's containers) that are stopped and
not started again: nobody here can restart them (a container stopped by hand stays stopped whatever its restart
policy), so /health, chatloop-status, the log and the requests that waited ``cluster.recovery_timeout_s`` name the
worker, its container (``$CHATLOOP_CONTAINER``) and the command that brings it back; started again, it is taken
back. Outside containers the command is the worker's own; SIGTERM ends such a worker at once."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cluster_harness import free_port

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
RECOVERY_S = 8
CONTAINER = "chatloop-worker-1"
ENGINE = "podman --runtime runc"
BRING_BACK = f"`{ENGINE} start {CONTAINER}`"
pytestmark = pytest.mark.slow


def _configs(split: Path, tmp_path: Path) -> list[Path]:
    """The splitter's four files with free ports, beside the partitions."""
    paths = []
    for k in range(4):
        raw = yaml.safe_load((split / "configs" / f"worker-config-{k}.yaml").read_text())
        raw.update(port=free_port(), metrics_port=free_port(), partitions_dir=str(split), worker_threads=1)
        paths.append(tmp_path / f"worker-config-{k}.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
    return paths


class Deployment:
    """A coordinator waiting for four workers, each started by itself; worker1 as if in a container."""

    def __init__(self, split: Path, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.configs = _configs(split, tmp_path)
        self.master, http = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http}"
        self.workers: dict[int, subprocess.Popen] = {}
        for k in range(4):
            self.start_worker(k)
        self.coordinator = self._start(
            [str(BIN / "chatloop-serve"), "cluster.launch=external", "cluster.num_workers=4",
             f"model.partitions_dir={split}", f"cluster.master_port={self.master}", f"server.port={http}",
             "cache.kv_cache_mb=64", "cluster.startup_timeout_s=180", f"cluster.recovery_timeout_s={RECOVERY_S}",
             "cluster.heartbeat_timeout_s=2", "cluster.rpc_timeout_s=20", "server.health_interval_s=1",
             f"hydra.run.dir={tmp_path / 'run'}"], "coordinator", ENV)

    def _start(self, cmd: list[str], name: str, env: dict) -> subprocess.Popen:
        log = (self.tmp_path / f"{name}.log").open("a")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def command(self, k: int) -> list[str]:
        return ["chatloop-worker", "--config", str(self.configs[k].resolve()), "--coordinator",
                f"127.0.0.1:{self.master}"]

    def start_worker(self, k: int) -> None:
        env = {**ENV, "CHATLOOP_CONTAINER": CONTAINER, "CHATLOOP_CONTAINER_ENGINE": ENGINE} if k == 1 else ENV
        self.workers[k] = self._start([str(BIN / "chatloop-worker"), *self.command(k)[1:]], f"worker{k}", env)

    def log(self) -> str:
        return (self.tmp_path / "coordinator.log").read_text()

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10)

    def wait_health(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.coordinator.poll() is None, self.log()[-4000:]
            try:
                last = self.health()
                if predicate(last):
                    return last.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"{what} not seen within {timeout} s (last /health: {last and last.text})\n{self.log()[-4000:]}")

    def stop(self) -> None:
        for proc in [self.coordinator, *self.workers.values()]:
            if proc.poll() is None:
                proc.kill()
        for proc in [self.coordinator, *self.workers.values()]:
            proc.wait(20)


def _stream(url: str, out: dict) -> None:
    """One long streamed completion: its events, and when it ended."""
    body = {"model": "smollm2", "prompt": "Tell me a long story about the sea.", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    events = out["events"] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    out["ended"] = time.monotonic()


def _error(health: dict, name: str) -> str:
    return next(s for s in health["stages"] if s["name"] == name).get("error") or ""


def test_a_worker_stopped_by_hand_is_named_with_the_command_that_brings_it_back(smollm2_split, tmp_path):
    d = Deployment(smollm2_split, tmp_path)
    try:
        d.wait_health(lambda r: r.status_code == 200, 300, "a healthy service")
        status = json.loads(subprocess.run([str(BIN / "chatloop-status"), "--url", d.url, "--json"], env=ENV,
                                           capture_output=True, text=True, timeout=60).stdout)
        assert [n.get("container") for n in status["nodes"][1:]] == [None, CONTAINER, None, None]

        # worker1's container is stopped by hand (docker kill: SIGKILL) in the middle of a stream.
        stream: dict = {}
        reader = threading.Thread(target=_stream, args=(d.url, stream), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while len(stream.get("events", [])) < 5:
            assert time.monotonic() < deadline and reader.is_alive(), (stream, d.log()[-3000:])
            time.sleep(0.1)
        d.workers[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()

        # While the coordinator waits for it, /health names the container and the command.
        health = d.wait_health(lambda r: r.status_code == 503 and BRING_BACK in r.text, 30, "a 503 naming the command")
        assert health["down"] == ["worker1"]
        assert _error(health, "worker1").startswith(f"recovering: worker1 (container {CONTAINER}): ")

        # The stream waits cluster.recovery_timeout_s, as before, then ends with an error that says the same.
        reader.join(RECOVERY_S + 60)
        assert not reader.is_alive(), "the stream still waits"
        assert stream["events"][-1] == "[DONE]"
        message = stream["events"][-2]["error"]["message"]
        assert (f"worker1 (container {CONTAINER}) did not rejoin the coordinator at 127.0.0.1:{d.master} within "
                f"cluster.recovery_timeout_s={RECOVERY_S} s: it is not running (stopped by hand, or it exited)"
                in message), message
        assert f"bring it back with {BRING_BACK}" in message, message
        assert stream["ended"] - killed > RECOVERY_S - 2, stream["ended"] - killed

        health = d.health().json()
        assert d.health().status_code == 503
        assert _error(health, "worker1").startswith(f"degraded: worker1 (container {CONTAINER}) did not rejoin")
        assert BRING_BACK in _error(health, "worker1")
        shown = subprocess.run([str(BIN / "chatloop-status"), "--url", d.url], capture_output=True, text=True,
                               env=ENV, timeout=60)
        assert shown.returncode == 1, shown.stdout + shown.stderr
        row = next(line for line in shown.stdout.splitlines() if line.startswith("worker1 "))
        assert CONTAINER in row and "DOWN: degraded:" in row and BRING_BACK in row, shown.stdout

        # Started again (what `podman start` does: the same command, the same environment), it is taken back.
        d.start_worker(1)
        d.wait_health(lambda r: r.status_code == 200, 120, "the service healthy again")
        log = d.log()
        assert re.search(r"generation \d+: worker1 rejoined, the pipeline is back", log), log[-4000:]

        # Outside containers: SIGTERM ends a worker at once, and it is named with its own command.
        stopped = time.monotonic()
        d.workers[0].send_signal(signal.SIGTERM)
        assert d.workers[0].wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - stopped < 3
        own = f"`{shlex.join(d.command(0))}`"
        health = d.wait_health(lambda r: r.status_code == 503 and own in r.text, 30, "a 503 naming its command")
        assert re.match(r"recovering: worker0 \(pid \d+ on [^)]+\): .*waiting up to cluster.recovery_timeout_s="
                        rf"{RECOVERY_S} s for it to rejoin: if it is not running, bring it back with ",
                        _error(health, "worker0")), health

        # Every log line of the healing names its stage.
        healing = [line for line in d.log().splitlines() if "[chatloop.runtime.healing]" in line]
        assert healing and all(re.search(r"\bworker[01]\b", line) for line in healing), healing
        assert any(f"lost worker1 (container {CONTAINER}): " in line for line in healing), healing
    finally:
        d.stop()
