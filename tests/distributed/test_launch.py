"""1 to 4 workers agree; torchrun launches as documented; bad configurations fail at start-up with a useful message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_harness import GREEDY_32, PLAIN_PROMPT, free_port, run_cluster

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def greedy_by_workers():
    ops = [{"name": "greedy", "op": "generate", "prompt": PLAIN_PROMPT, "params": GREEDY_32}]
    return {n: run_cluster([f"cluster.num_workers={n}"], ops)["greedy"]["token_ids"] for n in (1, 2, 3, 4)}


def test_one_to_four_workers_give_identical_greedy_tokens(greedy_by_workers, hf_greedy):
    for n, tokens in greedy_by_workers.items():
        assert tokens == hf_greedy["plain"], f"{n} workers differ"


def test_torchrun_five_ranks(hf_greedy, tmp_path):
    """The documented launch: every rank runs the same command, rank 0 coordinates."""
    cmd = [
        str(BIN / "torchrun"), "--nproc-per-node", "5", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "--no-python", str(BIN / "chatloop-generate"),
        f"prompt={PLAIN_PROMPT}", "chat=false", "max_new_tokens=12", "sampling.temperature=0", "cache.kv_cache_mb=64",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    from transformers import AutoTokenizer

    from chatloop.embedded import embedded_checkpoint

    expected = AutoTokenizer.from_pretrained(embedded_checkpoint()).decode(hf_greedy["plain"][:12])
    assert expected.strip() in proc.stdout, proc.stdout


def _generate(*overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "chatloop-generate"), f"cluster.master_port={free_port()}", "max_new_tokens=4", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def two_partitions(tmp_path_factory):
    from chatloop.partition import split_model

    out = tmp_path_factory.mktemp("two")
    split_model("smollm2", out, 2)
    yield out
    shutil.rmtree(out)  # 625 MB


def test_layer_ranges_that_do_not_match_the_manifest(two_partitions):
    workers = "[{start_layer:0,end_layer:9},{start_layer:10,end_layer:29}]"
    proc = _generate("cluster.num_workers=2", f"model.partitions_dir={two_partitions}", f"cluster.workers={workers}")
    assert proc.returncode == 2
    assert "cluster.workers[0] gives worker 0 layers 0-9, but partition_0.safetensors" in proc.stderr, proc.stderr
    assert "(the split's plan: 0-14, 15-29): make cluster.workers match the split" in proc.stderr, proc.stderr


def test_fewer_partitions_than_workers(two_partitions):
    proc = _generate("cluster.num_workers=4", f"model.partitions_dir={two_partitions}")
    assert proc.returncode == 2
    assert "holds 2 partitions but cluster.num_workers=4" in proc.stderr, proc.stderr


def test_missing_partition_file(two_partitions, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(two_partitions, broken)
    (broken / "partition_1.safetensors").unlink()
    proc = _generate("cluster.num_workers=2", f"model.partitions_dir={broken}")
    assert proc.returncode == 2
    assert "worker1" in proc.stderr and "partition_1.safetensors is missing" in proc.stderr, proc.stderr


def test_kv_cache_too_small_for_one_sequence(two_partitions):
    proc = _generate("cluster.num_workers=2", f"model.partitions_dir={two_partitions}", "cache.kv_cache_mb=0.1")
    assert proc.returncode == 2
    assert "raise cache.kv_cache_mb" in proc.stderr, proc.stderr


def test_bad_value_in_config():
    proc = _generate("batching.max_batch_size=0")
    assert proc.returncode == 2
    assert "batching.max_batch_size=0" in proc.stderr, proc.stderr
