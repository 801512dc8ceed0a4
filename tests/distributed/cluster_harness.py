"""Helpers for tests with real ranks on loopback: a coordinator process per cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from chatloop.network import free_port

DRIVER = Path(__file__).with_name("driver.py")
PLAIN_PROMPT = "The capital of France is"
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_32 = {"max_new_tokens": 32, "temperature": 0.0, "ignore_eos": True}


__all__ = ["CHAT_PROMPT", "GREEDY_32", "PLAIN_PROMPT", "free_port", "run_cluster"]


def run_cluster(overrides: list[str], ops: list[dict], timeout: float = 300) -> dict:
    """Start a cluster in a fresh process, run ``ops`` (see driver.py) in order; return ``{op name: result}``."""
    names = [op["name"] for op in ops]
    assert len(set(names)) == len(names), f"op names must be unique: {names}"
    spec = {"overrides": [f"cluster.master_port={free_port()}", "cache.kv_cache_mb=64", *overrides], "ops": ops}
    proc = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return json.loads(lines[-1].removeprefix("RESULT "))
