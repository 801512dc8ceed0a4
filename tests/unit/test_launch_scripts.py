"""The container scripts publish on loopback unless told otherwise, and never beyond it without an API key
(run with DOCKER=echo: the docker command they would run is printed, nothing is started)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_script(*verb: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CHATLOOP_API_KEY", "PUBLISH_ADDR", "API_KEY_FILE")}
    return subprocess.run(["bash", str(ROOT / "launch" / "docker-run.sh"), *verb], capture_output=True, text=True,
                          env={**clean, "DOCKER": "echo", **env}, timeout=30)


def test_ports_are_published_on_loopback_by_default():
    coordinator = _run_script("run-coordinator")
    assert coordinator.returncode == 0, coordinator.stderr
    assert "-p 127.0.0.1:8000:8000" in coordinator.stdout
    worker = _run_script("run-worker", "2")
    assert "-p 127.0.0.1:9093:9093" in worker.stdout and worker.stderr == ""


def test_publishing_beyond_loopback_without_an_api_key_is_refused():
    refused = _run_script("run-coordinator", PUBLISH_ADDR="0.0.0.0")
    assert refused.returncode == 2
    assert "without an API key" in refused.stderr and "PUBLISH_ADDR=127.0.0.1" in refused.stderr
    assert " run " not in refused.stdout  # nothing was started


def test_with_an_api_key_it_publishes_and_passes_the_key_by_name_not_value(tmp_path):
    keyed = _run_script("run-coordinator", PUBLISH_ADDR="0.0.0.0", CHATLOOP_API_KEY="s3cret-value")
    assert keyed.returncode == 0, keyed.stderr
    assert "-p 0.0.0.0:8000:8000" in keyed.stdout and "-e CHATLOOP_API_KEY " in keyed.stdout
    assert "s3cret-value" not in keyed.stdout  # not on the command line, where ps and docker inspect show it
    key = tmp_path / "key"
    key.write_text("from-a-file\n")
    filed = _run_script("run-coordinator", PUBLISH_ADDR="10.1.2.3", API_KEY_FILE=str(key))
    assert f"-v {key}:/run/secrets/chatloop_api_key:ro" in filed.stdout
    loud = _run_script("run-worker", "0", PUBLISH_ADDR="10.1.2.3")
    assert "published on 10.1.2.3:9091" in loud.stderr and "-p 10.1.2.3:9091:9091" in loud.stdout


def test_the_coordinator_container_refuses_to_serve_published_beyond_loopback_without_a_key(tmp_path):
    """The compose file cannot refuse by itself: the entrypoint does, before chatloop-serve starts."""
    fake = tmp_path / "chatloop-serve"
    fake.write_text("#!/bin/sh\necho served \"$@\"\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "CHATLOOP_ROLE": "coordinator"}

    def entrypoint(**more: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "launch" / "docker-entrypoint.sh")], capture_output=True,
                              text=True, env={**env, **more}, timeout=30)

    refused = entrypoint(CHATLOOP_PUBLISH_ADDR="0.0.0.0")
    assert refused.returncode == 2 and "without an API key" in refused.stderr and "served" not in refused.stdout
    assert entrypoint(CHATLOOP_PUBLISH_ADDR="0.0.0.0", CHATLOOP_API_KEY="k").stdout.startswith("served")
    assert entrypoint().stdout.startswith("served")  # published on loopback (the default)
