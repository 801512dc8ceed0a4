"""Where a worker runs and what it may use: the machine it shares with other stages, its cgroup's CPU quota."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from chatloop.engine.pipeline import StageReport
from chatloop.worker_settings import cpu_quota, machine_id, stages_at_once
from tests.conftest import cgroup_tree

CPU_V1 = Path("/sys/fs/cgroup/cpu")


def _stage(host: str, machine: str | None, cpu_limit: float | None = None, threads: int = 2) -> StageReport:
    return StageReport(name="w", index=0, host=host, machine=machine, cores=(0, 1), threads=threads,
                       cpu_limit=cpu_limit)


def test_containers_of_one_machine_take_turns_though_their_hostnames_differ():
    # Five containers on one 2-core host: four hostnames, one kernel. Kept apart by hostname they computed four
    # stages at once, 8 OpenMP threads on 2 cores.
    assert stages_at_once([_stage(f"container{k}", "boot-1") for k in range(4)]) == 1
    assert stages_at_once([_stage(f"container{k}", f"boot-{k % 2}") for k in range(4)]) == 2  # two machines
    assert stages_at_once([_stage("a", None), _stage("a", None), _stage("b", None)]) == 2  # old workers: by host


def test_cpu_quotas_bound_how_many_stages_compute_at_once():
    assert stages_at_once([_stage(f"c{k}", "m", cpu_limit=0.5, threads=1) for k in range(4)]) == 2
    assert stages_at_once([_stage(f"c{k}", "m", cpu_limit=1.0, threads=1) for k in range(4)]) == 2  # 2 cores
    assert stages_at_once([_stage(f"c{k}", "m", cpu_limit=None, threads=1) for k in range(4)]) == 2


def test_the_machine_is_the_kernels_boot_id():
    assert machine_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_cpu_quota_reads_cgroup_v2_and_takes_the_tightest_ancestor(tmp_path):
    root, me = cgroup_tree(tmp_path, {"cpu.max": "max 100000\n", "kube/cpu.max": "150000 100000\n",
                                "kube/pod/cpu.max": "max 100000\n"}, "0::/kube/pod\n")
    assert cpu_quota(root, me) == 1.5
    root, me = cgroup_tree(tmp_path / "free", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cpu_quota(root, me) is None


def test_cpu_quota_reads_cgroup_v1_on_the_host_and_inside_a_container(tmp_path):
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
             "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
             "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}
    root, me = cgroup_tree(tmp_path / "host", files,
                           "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    assert cpu_quota(root, me) == 0.5
    # In a container the mount is the container's own cgroup; the path it is given is the host's.
    inside = {"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    root, me = cgroup_tree(tmp_path / "inside", inside, "1:cpu:/libpod_parent/libpod-0123\n")
    assert cpu_quota(root, me) == 2.0


@pytest.mark.skipif(os.geteuid() != 0 or not (CPU_V1 / "cpu.cfs_quota_us").exists(),
                    reason="needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
def test_a_worker_under_a_real_cpu_quota_uses_one_thread_per_core_it_may_use(tmp_path):
    group = CPU_V1 / f"chatloop-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("50000")  # half a core
        code = (f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid()));"
                "from chatloop.worker_settings import apply_worker_settings as a;"
                "s = a(0, 1, 8, True); print(s['cpu_limit'], s['threads'])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["0.5", "1"]
    finally:
        group.rmdir()


def test_chatloop_worker_runs_with_the_spin_count_of_its_config(tmp_path, tiny_checkpoint):
    """``chatloop-worker`` imports torch (and libgomp) before it reads its config: it starts itself again, same
    pid, with GOMP_SPINCOUNT set, as the workers the coordinator starts are."""
    from chatloop.partition.splitter import split_model

    split_model(str(tiny_checkpoint("llama").path), tmp_path, 1, progress=False)
    config = tmp_path / "configs" / "worker-config-0.yaml"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "chatloop-worker"), "--config", str(config),
                             "--coordinator", "127.0.0.1:9"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, environ = time.monotonic() + 60, b""
        while time.monotonic() < deadline and b"GOMP_SPINCOUNT=20000" not in environ:
            time.sleep(0.2)
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"GOMP_SPINCOUNT=20000" in environ.split(b"\0")
    finally:
        proc.kill()
        proc.wait()
