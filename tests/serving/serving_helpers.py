"""Helpers for the HTTP API tests: free loopback ports, a uvicorn server in a thread, /metrics parsing."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from chatloop.network import free_port, free_ports

__all__ = ["GREETING", "HOST", "free_port", "free_ports", "scrape", "serve_in_thread", "stop_group", "wait_until"]

HOST = "127.0.0.1"
GREETING = [{"role": "user", "content": "What is the capital of France?"}]


@contextmanager
def serve_in_thread(app, port: int | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn on a loopback port in a daemon thread; yield its base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {HOST}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def scrape(url: str) -> dict[str, float]:
    """GET a Prometheus endpoint and parse it: {'name{label="v",...}': value} (labels sorted)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """Poll ``predicate()`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{message} not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 30) -> None:
    """Send ``sig`` to the process group ``proc`` leads (a CLI and the workers it started); SIGKILL it if it is
    still there after ``grace_s``."""
    os.killpg(proc.pid, sig)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
