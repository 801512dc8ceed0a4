"""Worker CPU settings, the interactive chat, and Ctrl-C: every rank stops, none is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from cluster_harness import free_port, run_cluster

BIN = Path(sys.executable).parent


def test_pinning_threads_and_plain_kernels():
    stages = run_cluster(
        ["cluster.num_workers=2", "worker.worker_threads=1", "worker.enable_simd=false", "worker.omp_spin_count=1234"],
        [{"name": "describe", "op": "describe"}],
    )["describe"]
    assert [s["simd"] for s in stages] == ["DEFAULT", "DEFAULT"]  # ATEN_CPU_CAPABILITY=default took effect
    assert [s["omp_spin_count"] for s in stages] == ["1234", "1234"]  # in the workers' environment before torch loaded
    assert all(s["threads"] == 1 for s in stages)
    if len(os.sched_getaffinity(0)) >= 2:
        assert stages[0]["cores"] != stages[1]["cores"]  # each worker on its own core


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_chat_answers_then_ctrl_c_stops_every_rank(tmp_path):
    proc = subprocess.Popen(
        [str(BIN / "chatloop-chat"), "cluster.num_workers=2", f"cluster.master_port={free_port()}",
         "cache.kv_cache_mb=64", "max_new_tokens=16", f"hydra.run.dir={tmp_path}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True,
        start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        # As from a terminal: while a thread of this process runs system() (SIGINT and SIGQUIT ignored in it
        # meanwhile), a child would inherit an ignored SIGINT (seen: SigIgn 0x81001006) and Python keeps it so.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        proc.stdin.write("What is the capital of France?\n")
        proc.stdin.flush()
        seen = ""
        deadline = time.monotonic() + 180
        # The whole answer and the next prompt: a Ctrl-C during an answer only stops that answer.
        while not ("Paris" in seen and seen.endswith("you> ")) and time.monotonic() < deadline:
            char = proc.stdout.read(1)
            if not char:
                break
            seen += char
        assert "Paris" in seen and seen.endswith("you> "), seen
        workers = _descendants(proc.pid)
        assert len([w for w in workers if "chatloop.runtime" in " ".join(w.cmdline())]) == 2
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            dump = subprocess.run([str(BIN / "py-spy"), "dump", "--pid", str(proc.pid)], capture_output=True, text=True)
            log = (tmp_path / "stderr").read_text()[-3000:]
            status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            masks = [line for line in status if line.startswith("Sig")]  # blocked, ignored, caught signals
            log = "\n".join(masks) + "\n" + log
            raise AssertionError(
                f"chatloop-chat still runs 20 s after Ctrl-C:\n{dump.stdout}{dump.stderr}\n{log}") from None
        assert time.monotonic() - started < 20
        _gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphans: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
