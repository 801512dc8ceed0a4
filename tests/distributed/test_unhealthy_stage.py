"""A worker whose outputs turn NaN over real RPC: it reports itself unhealthy, self-healing replaces it, and the
replacement hashes its partition as it loads: 4 MiB of it overwritten under a restored mtime (the damage that made
the NaN) is refused, and the service stays degraded saying which file and what to do, instead of serving NaN."""

from __future__ import annotations

import shutil

from cluster_harness import run_cluster

from chatloop.partition import Manifest
from chatloop.partition.safetensors_stream import read_header
from chatloop.partition.splitter import split_model
from chatloop.stage.fault_injection import NON_FINITE

NAN_F32 = "0000c07f"  # a float32 NaN, little-endian


def test_an_unhealthy_worker_is_replaced_and_its_damaged_partition_refused(tmp_path):
    parts = tmp_path / "parts"
    split_model("smollm2", parts, 2, progress=False)
    path = parts / "partition_1.safetensors"
    tensor = read_header(path)["model.layers.20.mlp.down_proj.weight"]
    assert tensor.begin + 4 * 2**20 < path.stat().st_size
    expected = Manifest.load(parts).partitions[1].blake3
    results = run_cluster(["cluster.num_workers=2", f"model.partitions_dir={parts}", "cluster.heartbeat_timeout_s=2",
                           "cluster.max_restarts=2"], [
        {"name": "before", "op": "generate", "prompt": "Hello", "params": {"max_new_tokens": 2}},
        # The loaded weights are the ones the manifest describes; the file changes under them, as on a bad disk.
        {"name": "overwrite", "op": "overwrite", "path": str(path), "offset": tensor.begin, "hex": NAN_F32,
         "repeat": 2**20},
        {"name": "inject", "op": "inject", "stage": 1, "message": NON_FINITE},  # and so do the weights in memory
        {"name": "failed", "op": "generate", "prompt": "Hello", "params": {"max_new_tokens": 2}},
        {"name": "degraded", "op": "wait_state", "state": "degraded", "timeout": 120},
        {"name": "stats", "op": "stats"},
        {"name": "health", "op": "describe"},
        {"name": "refused", "op": "generate", "prompt": "Hello", "params": {"max_new_tokens": 2}},
    ], timeout=300)
    shutil.rmtree(parts, ignore_errors=True)
    assert "error" not in results["before"], results["before"]
    assert all(results["overwrite"]["unchanged"]), "size, mtime, inode and device are what they were"
    assert results["failed"]["error"].startswith(
        "StageError: worker1 is unhealthy: its logits hold NaN or infinity for its one sequence of micro-batch")
    assert results["degraded"]["state"] == "degraded"
    assert results["stats"]["restarts"]["worker1"] == 1  # replaced once, and not again: the replacement loaded
    worker1 = next(s for s in results["health"] if s["name"] == "worker1")
    assert worker1["error"].startswith("degraded: worker1 could not load its stage")
    assert f"{path}: blake3 differs from the manifest's (expected {expected}, found " in worker1["error"]
    assert "copy it again from the splitter's output" in worker1["error"]
    assert "worker1" in results["refused"]["error"] and "blake3 differs" in results["refused"]["error"]


def test_weights_gone_bad_in_memory_are_reloaded_and_the_service_goes_on():
    results = run_cluster(["cluster.num_workers=2", "cluster.heartbeat_timeout_s=2"], [
        {"name": "inject", "op": "inject", "stage": 0, "message": NON_FINITE},  # the file on disk is whole
        {"name": "failed", "op": "generate", "prompt": "Hello", "params": {"max_new_tokens": 2}},
        # Sent at once: it waits while worker0 is replaced (its partition hashed again) and then runs.
        {"name": "after", "op": "generate", "prompt": "Hello", "params": {"max_new_tokens": 2}},
        {"name": "stats", "op": "stats"},
        {"name": "health", "op": "describe"},
    ], timeout=300)
    assert results["failed"]["error"].startswith(
        "StageError: worker0 is unhealthy: its hidden states hold NaN or infinity for its one sequence")
    assert "error" not in results["after"] and len(results["after"]["token_ids"]) == 2, results["after"]
    assert results["stats"]["restarts"]["worker0"] == 1 and len(results["stats"]["recovery_seconds"]) == 1
    assert results["stats"]["state"] == "serving" and all(s["error"] is None for s in results["health"])
