"""Private by default: a running server and its workers listen on loopback only, and the API key reaches no log,
run folder, command line or worker."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from serving_helpers import HOST, free_port, free_ports, stop_group

pytestmark = pytest.mark.slow

SERVE = Path(sys.executable).with_name("chatloop-serve")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_a_server_listens_on_loopback_only_and_keeps_its_key_to_itself(smollm2_split, tmp_path):
    key = f"sk-{secrets.token_hex(16)}"
    port, run_dir = free_port(), tmp_path / "run"
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "CHATLOOP_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    command = [str(SERVE), f"model.partitions_dir={smollm2_split}-two", "cluster.num_workers=2",
               f"cluster.master_port={free_port()}", f"server.port={port}", f"worker.metrics_port={free_ports(2)}",
               f"hydra.run.dir={run_dir}", "log_level=INFO"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=3).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text

        processes = _tree(proc.pid)
        assert len(processes) >= 3  # the coordinator and its two workers
        listening = [(p.pid, c.laddr) for p in processes for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip in ("127.0.0.1", "::1") for _, addr in listening), listening
        for p in processes:
            assert key not in " ".join(p.cmdline())
            if p.pid != proc.pid:  # a worker has no use for it
                assert "CHATLOOP_API_KEY" not in p.environ()
    finally:
        stop_group(proc, signal.SIGINT)
    assert key not in log_path.read_text()
    written = [f for f in run_dir.rglob("*") if f.is_file()]
    assert all(key not in f.read_text(errors="replace") for f in written), written


def test_a_key_on_the_command_line_is_refused_before_anything_is_written(tmp_path):
    proc = subprocess.run([str(SERVE), "server.api_key=hunter2", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "do not put the API key on the command line" in proc.stderr and "CHATLOOP_API_KEY" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_the_http_port_is_held_before_the_cluster_starts_and_a_taken_one_is_refused_at_once(tmp_path):
    """chatloop-serve binds its HTTP port before it loads anything: while it loads, no other socket (the cluster's
    RPC and link ports among them) can take the port, which once made uvicorn fail to bind after the model had
    loaded; a port already taken is refused in seconds, naming the setting, and nothing is left running."""
    import socket

    from chatloop.serving.app import bind_http_port

    port = free_port()
    held = bind_http_port(HOST, port)
    try:
        with socket.socket() as other, pytest.raises(OSError):
            other.bind((HOST, port))
        with socket.socket() as ephemeral:  # (the kernel hands out no port that is bound)
            ephemeral.bind((HOST, 0))
            assert ephemeral.getsockname()[1] != port
    finally:
        held.close()
    with socket.create_server((HOST, port)):  # another server holds it
        with pytest.raises(RuntimeError, match=f"could not serve on {HOST}:{port}: .* set server.port"):
            bind_http_port(HOST, port)
        started = time.monotonic()
        done = subprocess.run([str(SERVE), "model.partitions_dir=/nonexistent", f"server.port={port}",
                               f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - started < 60
    assert f"could not serve on {HOST}:{port}" in done.stdout + done.stderr, done.stderr[-2000:]
