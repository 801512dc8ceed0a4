"""Starting a cluster: a worker that dies says why at once; scripts need no __main__ guard; nothing listens off
loopback unless asked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from cluster_harness import free_port

BIN = Path(sys.executable).parent


def test_a_worker_that_dies_at_start_up_fails_the_start_with_its_own_words(tmp_path):
    # sitecustomize runs first in every interpreter on this path: worker1 (and only it) dies at once.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('CHATLOOP_WORKER_INDEX') == '1':\n"
        "    print('worker1 could not start: its disk is on fire', file=sys.stderr)\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "chatloop-generate"), "cluster.num_workers=2", f"cluster.master_port={free_port()}",
         "cluster.startup_timeout_s=120", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "worker1 (pid" in proc.stderr and "exited with code 3 while the cluster started" in proc.stderr
    assert "its disk is on fire" in proc.stderr.split("its last output:")[-1]
    assert time.monotonic() - started < 60  # at once, not after cluster.startup_timeout_s
    assert not [p for p in psutil.process_iter(["cmdline"]) if "chatloop.runtime" in " ".join(p.info["cmdline"] or [])
                and str(tmp_path) in str(p.environ().get("PYTHONPATH", ""))]  # no worker left behind


def test_a_script_without_a_main_guard_works(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(
        "from chatloop import ChatLoop, load_config\n"
        f"llm = ChatLoop.start(load_config(['cluster.num_workers=2', 'cluster.master_port={free_port()}', "
        "'cache.kv_cache_mb=64']))\n"
        "print('ANSWER', llm.generate('The capital of France is', max_new_tokens=4, ignore_eos=True).text)\n"
        "llm.shutdown()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "ANSWER" in proc.stdout, proc.stderr[-3000:]


def test_two_clusters_one_after_the_other_in_one_process(tmp_path):
    script = tmp_path / "twice.py"
    script.write_text(
        "from chatloop import ChatLoop, load_config\n"
        "answers = []\n"
        "for workers in (2, 1):\n"
        f"    with ChatLoop.start(load_config([f'cluster.num_workers={{workers}}', 'cluster.master_port={free_port()}',"
        " 'cache.kv_cache_mb=64'])) as llm:\n"
        "        reply = llm.generate('The capital of France is', max_new_tokens=4, ignore_eos=True)\n"
        "        answers.append(reply.token_ids)\n"
        "print('SAME', answers[0] == answers[1])\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "SAME True" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
