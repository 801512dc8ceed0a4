"""One worker at a time, as the reference deploys: ``chatloop-worker --config configs/worker-config-N.yaml`` per
worker (started before or after the coordinator), ``chatloop-serve cluster.launch=external`` waiting for them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cluster_harness import free_port

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_way_split(tmp_path_factory):
    from chatloop.partition import split_model

    out = tmp_path_factory.mktemp("external")
    split_model("smollm2", out, 2, progress=False)
    yield out
    shutil.rmtree(out)  # 625 MB


def _configs(split: Path, tmp_path: Path, **changes_to_worker_1) -> list[Path]:
    """The splitter's files with free ports (and ``changes`` to worker 1's), kept beside the partitions."""
    paths = []
    for k in range(2):
        raw = yaml.safe_load((split / "configs" / f"worker-config-{k}.yaml").read_text())
        raw.update(port=free_port(), metrics_port=free_port(), partitions_dir=str(split), worker_threads=1)
        if k == 1:
            raw.update(changes_to_worker_1)
        paths.append(tmp_path / f"worker-config-{k}.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
    return paths


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _coordinator(split: Path, tmp_path: Path, master_port: int, http_port: int) -> list[str]:
    return [str(BIN / "chatloop-serve"), "cluster.launch=external", "cluster.num_workers=2",
            f"model.partitions_dir={split}", f"cluster.master_port={master_port}", f"server.port={http_port}",
            "cache.kv_cache_mb=64", "cluster.startup_timeout_s=120", f"hydra.run.dir={tmp_path / 'run'}"]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_workers_started_one_by_one_from_their_files_serve_the_model(two_way_split, tmp_path):
    configs = _configs(two_way_split, tmp_path)
    master, http = free_port(), free_port()
    # The workers first: they wait for the coordinator.
    procs = [_start([str(BIN / "chatloop-worker"), "--config", str(c), "--coordinator", f"127.0.0.1:{master}"],
                    tmp_path / f"worker{k}.log") for k, c in enumerate(configs)]
    time.sleep(2)
    procs.append(_start(_coordinator(two_way_split, tmp_path, master, http), tmp_path / "coordinator.log"))
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert all(p.poll() is None for p in procs), (tmp_path / "coordinator.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "coordinator.log").read_text()[-3000:]
            time.sleep(0.5)
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        log = (tmp_path / "coordinator.log").read_text()
        assert "worker0 joined generation 0" in log and "worker1 joined generation 0" in log, log[-3000:]

        files = [yaml.safe_load(c.read_text()) for c in configs]
        for own in files:  # each worker's health endpoint and metrics where its file says
            health = httpx.get(f"http://127.0.0.1:{own['port']}/health", timeout=5)
            assert health.status_code == 200 and health.json()["stage_loaded"] is True
            assert "chatloop_stage_micro_batches_total" in httpx.get(
                f"http://127.0.0.1:{own['metrics_port']}/metrics", timeout=5).text
        status = subprocess.run([str(BIN / "chatloop-status"), "--url", url, "--json"], capture_output=True,
                                text=True, env=ENV, timeout=60)
        assert status.returncode == 0, status.stderr
        workers = [n for n in json.loads(status.stdout)["nodes"] if n["role"] == "worker"]
        assert [(n["layers"], n["ports"]["health"], n["state"]) for n in workers] == [
            ("0-14", files[0]["port"], "up"), ("15-29", files[1]["port"], "up")]
    finally:
        _stop(procs)


def test_a_file_that_disagrees_with_the_coordinator_fails_the_start_naming_both(two_way_split, tmp_path):
    configs = _configs(two_way_split, tmp_path, start_layer=16)
    master, http = free_port(), free_port()
    coordinator = _start(_coordinator(two_way_split, tmp_path, master, http), tmp_path / "coordinator.log")
    workers = [_start([str(BIN / "chatloop-worker"), "--config", str(c), "--coordinator", f"127.0.0.1:{master}"],
                      tmp_path / f"worker{k}.log") for k, c in enumerate(configs)]
    try:
        assert coordinator.wait(180) != 0
        log = (tmp_path / "coordinator.log").read_text()
        assert f"{configs[1]} gives worker 1 layers 16-29, but partition_1.safetensors in" in log, log[-3000:]
        assert "holds layers 15-29 (the split's plan: 0-14, 15-29): use the file chatloop-split wrote" in log, \
            log[-3000:]
    finally:
        _stop([coordinator, *workers])
