"""The probe a worker runs when it joins (issue 24, point 1): its cores, memory, bandwidth and layer times."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from chatloop.models import LayerRange
from chatloop.partition.splitter import split_model
from chatloop.stage.probe import _cgroup_memory_room, memory_available, probe_host, round_trip_s
from tests.conftest import cgroup_tree

CPU_V1 = Path("/sys/fs/cgroup/cpu")


@pytest.fixture(scope="module")
def tiny_split(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe-split")
    split_model(str(tiny_checkpoint("llama").path), out, 2, progress=False)  # 5 layers: 0-2, 3-4
    return out


def test_the_probe_reports_what_the_placement_needs(tiny_split):
    figures = probe_host("w0", tiny_split, hop_s=0.002, min_seconds=0.02)
    assert sorted(figures.decode_s) == [1, 4, 16]
    assert all(0 < t < 1 for t in figures.decode_s.values())
    assert 0 < figures.prefill_s_per_token < 1
    assert 0 < figures.memory_bytes <= psutil.virtual_memory().total
    assert figures.bandwidth_gb_s > 0.1
    assert figures.threads == torch.get_num_threads()
    assert figures.cores == len(os.sched_getaffinity(0))
    assert figures.held == (LayerRange(0, 4),)
    assert figures.hop_s == 0.002
    # stages of one layer and of two give a layer and the step's fixed cost; the last layer's, the head's
    assert sorted(figures.step_fixed_s) == sorted(figures.head_s) == [1, 4, 16]
    assert all(t >= 0 for t in [*figures.step_fixed_s.values(), *figures.head_s.values()])


def test_the_probe_reads_only_the_files_the_host_holds(tiny_split, tmp_path):
    copied = tmp_path / "one-file"
    shutil.copytree(tiny_split, copied)
    (copied / "partition_0.safetensors").unlink()
    figures = probe_host("w1", copied, min_seconds=0.01)
    assert figures.held == (LayerRange(3, 4),)
    assert figures.step_fixed_s is None and figures.head_s is not None  # layer 3 alone in the middle; 4 has the head
    with pytest.raises(ValueError, match="holds none of the split's partition files"):
        probe_host("w1", copied, held=[], min_seconds=0.01)


def test_the_layer_is_timed_in_a_stage_too_big_for_the_caches(tiny_split, monkeypatch):
    # One layer timed alone runs from the caches; a whole stage streams its weights from memory (SmolLM2 float32:
    # 0.62 ms a layer in a stage of 4, 1.33 in one of 16), so the probe also times a stage of stream_bytes' layers.
    import chatloop.stage.probe as probe

    loaded = []
    real = probe.load_layer_range
    monkeypatch.setattr(probe, "load_layer_range",
                        lambda d, layers, **kw: loaded.append(layers) or real(d, layers, **kw))
    probe.probe_layer(tiny_split, batches=(1,), min_seconds=0.01)
    assert LayerRange(1, 3) in loaded  # the middle layers held (1-3 of 0-4): as many as there are, up to the bytes
    loaded.clear()
    probe.probe_layer(tiny_split, batches=(1,), min_seconds=0.01, stream_bytes=1)
    assert loaded == [LayerRange(1, 1), LayerRange(1, 2), LayerRange(4, 4)]  # one layer already passes 1 byte


def test_a_cpu_limited_host_times_each_figure_over_several_cfs_periods():
    from chatloop.stage.probe import MIN_SECONDS, probe_seconds

    assert probe_seconds(None, 2) == MIN_SECONDS and probe_seconds(4.0, 2) == MIN_SECONDS
    assert probe_seconds(1 / 3, 1) == pytest.approx(3 * MIN_SECONDS)  # a third of a core: 3 periods a window
    assert probe_seconds(1.0, 2) == pytest.approx(2 * MIN_SECONDS)  # two threads sharing one core's quota
    assert probe_seconds(0.05, 1) == pytest.approx(4 * MIN_SECONDS)  # at most 4x: a probe stays seconds long


def test_memory_room_reads_cgroup_v1_and_v2_limits(tmp_path):
    root, me = cgroup_tree(tmp_path / "v2", {"box/memory.max": "1000000\n", "box/memory.current": "250000\n"},
                           "0::/box\n")
    assert _cgroup_memory_room(root, me) == 750000
    assert memory_available(root, me) == 750000
    root, me = cgroup_tree(tmp_path / "v1", {"memory/docker/a/memory.limit_in_bytes": "4000000\n",
                                       "memory/docker/a/memory.usage_in_bytes": "1000000\n"},
                     "5:memory:/docker/a\n3:cpu,cpuacct:/docker/a\n")
    assert _cgroup_memory_room(root, me) == 3000000
    root, me = cgroup_tree(tmp_path / "cached", {"memory/a/memory.limit_in_bytes": "4000000\n",
                                           "memory/a/memory.usage_in_bytes": "3000000\n",
                                           "memory/a/memory.stat": "cache 2500000\ntotal_inactive_file 2000000\n"},
                     "5:memory:/a\n")
    assert _cgroup_memory_room(root, me) == 3000000  # files read once go first: room
    root, me = cgroup_tree(tmp_path / "nested", {"memory/pod/memory.limit_in_bytes": "5000000\n",
                                           "memory/pod/memory.usage_in_bytes": "4000000\n",
                                           "memory/pod/c/memory.limit_in_bytes": f"{2**63 - 4096}\n",
                                           "memory/pod/c/memory.usage_in_bytes": "3000000\n"}, "5:memory:/pod/c\n")
    assert _cgroup_memory_room(root, me) == 1000000  # the parent's limit binds
    root, me = cgroup_tree(tmp_path / "free", {"memory/memory.limit_in_bytes": f"{2**63 - 4096}\n",
                                         "memory/memory.usage_in_bytes": "5\n"}, "5:memory:/\n")
    assert _cgroup_memory_room(root, me) is None
    assert memory_available(root, me) > 0


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists(),
                    reason="needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
def test_a_worker_under_a_real_memory_limit_reports_only_the_room_left():
    group = Path("/sys/fs/cgroup/memory") / f"chatloop-probe-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(3 * 2**30))
        code = (f"import os; open('{group}/cgroup.procs', 'w').write(str(os.getpid()));"
                "from chatloop.stage.probe import memory_available; print(memory_available())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert 0 < int(out.stdout) < 3 * 2**30  # the limit less what the process took, whatever the machine has
    finally:
        group.rmdir()


def test_round_trip_is_the_median_of_the_pings():
    assert 0.009 < round_trip_s(lambda: time.sleep(0.01)) < 0.05


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not (CPU_V1 / "cpu.cfs_quota_us").exists(),
                    reason="needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
def test_a_worker_held_to_a_tenth_of_a_core_measures_itself_slower(tiny_split):
    # The process joins its group once imported: the quota then slows the probe alone.
    code = ("import json, os, sys; group = sys.argv[2]\n"
            "import torch; torch.set_num_threads(1)\n"
            "from chatloop.stage.probe import probe_host\n"
            "if group: open(group + '/cgroup.procs', 'w').write(str(os.getpid()))\n"
            "f = probe_host('w', sys.argv[1], min_seconds=0.3, batches=(1, 16))\n"
            "print(json.dumps({'decode': f.decode_s[16], 'limit': f.cpu_limit}))")

    def probe(group: str) -> dict:
        out = subprocess.run([sys.executable, "-c", code, str(tiny_split), group], capture_output=True, text=True,
                             timeout=240)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    group = CPU_V1 / f"chatloop-probe-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("10000")
        free, held = probe(""), probe(str(group))
    finally:
        group.rmdir()
    assert held["limit"] == pytest.approx(0.1)
    assert free["limit"] is None or free["limit"] > 0.5
    # 10x on an idle machine; others' load slows the free probe too (the machine is shared)
    assert held["decode"] > 3 * free["decode"], (held, free)
