"""The sweep, the baselines and the report run end to end on a tiny random model, so that the tooling cannot rot.

One Hydra multirun of three jobs (transformers, ChatLoop in one process, ChatLoop over 2 RPC
workers), each in its own process, then the report. ChatLoop's cache (partitions) goes to a
temporary folder.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from benchmarks.checkpoints import SHAPES, write_random_checkpoint

    tmp = tmp_path_factory.mktemp("sweep")
    checkpoint = write_random_checkpoint(SHAPES["tiny"], tmp / "random-tiny", dtype="float32")
    results = tmp / "results.jsonl"
    command = [
        sys.executable,
        "-m",
        "benchmarks.sweep",
        "-m",
        f"model.name={checkpoint}",
        "model.dtype=float32",
        "benchmark.mode=hf,inprocess,chatloop",
        "cluster.num_workers=2",
        "batching.max_batch_size=1",
        "benchmark.num_requests=2",
        "benchmark.prompt_tokens=8",
        "benchmark.new_tokens=2",
        "benchmark.bandwidth_mb=64",
        "benchmark.timeout_s=150",
        f"benchmark.results={results}",
        "cache.kv_cache_mb=16",
        "worker.worker_threads=1",
        f"hydra.sweep.dir={tmp / 'multirun'}",
    ]
    env = {
        **os.environ,
        "CHATLOOP_CACHE": str(tmp / "cache"),
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    return tmp, results, rows, proc.stdout


def test_every_job_writes_a_row_with_the_measurements(sweep):
    _, _, rows, stdout = sweep
    assert [r["mode"] for r in rows] == ["hf", "inprocess", "chatloop"], stdout
    for r in rows:
        assert not r.get("error"), r.get("error")
        assert r["tokens"] == 2 * 2 and r["tokens_per_s"] > 0
        assert r["ttft_ms"]["n"] == 2 and r["ttft_ms"]["p50"] > 0
        assert r["itl_ms"]["n"] == 2 and r["itl_ms"]["p99"] >= r["itl_ms"]["p50"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(1 / r["itl_ms"]["p50"] * 1e3)  # batch 1: one token a gap
        assert r["bandwidth"]["read_gbs"] > 0 and r["roofline_ms"] > 0 and r["weight_bytes_per_token"] > 0
        assert r["config"]["model"]["name"].endswith("random-tiny") and r["max_batch_size"] == 1
        assert r["coordinator_rss_bytes"] > 0 and r["host"]["cores"] >= 1
    hf, inprocess, chatloop = rows
    assert hf["stages"] == [] and hf["num_workers"] == 1
    assert inprocess["num_workers"] == 1 and inprocess["config"]["cluster"]["in_process"] is True
    assert [s["name"] for s in chatloop["stages"]] == ["worker0", "worker1"]
    for stage in chatloop["stages"]:
        assert stage["rss_bytes"] > 0 and 0 < stage["busy_fraction"] <= 1.05 and stage["num_micro_batches"] == 4
    assert set(chatloop["timeline"]["stages"]) == {"worker0", "worker1"}
    assert len(chatloop["timeline"]["coordinator"]) == chatloop["micro_batches"]["count"] == 4
    assert "tok/s" in stdout


def test_report_writes_markdown_and_plots(sweep):
    from benchmarks.report import main

    tmp, results, _, _ = sweep
    out = tmp / "report"
    assert main([str(results), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "| transformers | 1 | 1 |" in markdown and "| ChatLoop 2 workers | 2 | 1 |" in markdown
    assert "| decode tok/s |" in markdown
    assert "Memory-bandwidth roofline" in markdown and "Pipeline timelines" in markdown
    pictures = [line.split("](")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]
    assert "throughput_vs_workers.png" in pictures and "throughput_vs_batch.png" in pictures
    assert any(p.startswith("timeline_job") for p in pictures)
    for name in pictures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baselines_ignore_the_cluster_settings():
    # A sweep over workers measures each baseline once: their key leaves the cluster out.
    from benchmarks.config import BenchmarkConfig
    from benchmarks.sweep import _baseline_key

    base = {"model": {"name": "m"}, "batching": {"max_batch_size": 4}, "cache": {"kv_cache_mb": 64}}
    two, four = {**base, "cluster": {"num_workers": 2}}, {**base, "cluster": {"num_workers": 4}}
    hf, chatloop = BenchmarkConfig(mode="hf"), BenchmarkConfig(mode="chatloop")
    assert _baseline_key(two, hf) == _baseline_key(four, hf)
    assert _baseline_key(two, hf) != _baseline_key(two, chatloop)
    assert _baseline_key(two, hf) != _baseline_key({**two, "batching": {"max_batch_size": 8}}, hf)


def test_roofline_pairs_bandwidth_and_decode_rounds(tmp_path):
    from benchmarks.checkpoints import SHAPES, write_random_checkpoint

    checkpoint = write_random_checkpoint(SHAPES["tiny"], tmp_path / "random-tiny", dtype="float32")
    out = tmp_path / "roofline.json"
    command = [sys.executable, "-m", "benchmarks.roofline", "--model", str(checkpoint), "--rounds", "3", "--steps", "2",
               "--bandwidth-mb", "64", "--json", str(out), "worker.native_kernels=false"]
    env = {**os.environ, "CHATLOOP_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 3 and result["overrides"] == ["worker.native_kernels=false"]
    for r in result["rounds"]:
        assert r["bandwidth_gbs"] > 0 and r["step_ms"] > 0
        assert r["fraction"] == pytest.approx(
            result["weight_bytes_per_token"] / (r["bandwidth_gbs"] * 1e9) * 1e3 / r["step_ms"])
    assert result["fraction_min"] <= result["fraction_median"] <= result["fraction_max"]
    assert "of the roofline (median of 3 rounds" in proc.stdout


def test_paired_measures_every_mode_in_turns_and_takes_ratios_within_rounds(tmp_path):
    from benchmarks.checkpoints import SHAPES, write_random_checkpoint

    checkpoint = write_random_checkpoint(SHAPES["tiny"], tmp_path / "random-tiny", dtype="float32")
    out = tmp_path / "paired.json"
    command = [sys.executable, "-m", "benchmarks.paired", "--rounds", "2", "--json", str(out),
               f"model.name={checkpoint}", "model.dtype=float32", "cluster.num_workers=2", "batching.max_batch_size=2",
               "benchmark.num_requests=2", "benchmark.prompt_tokens=8", "benchmark.new_tokens=3",
               "benchmark.timeout_s=150", "cache.kv_cache_mb=16", "worker.worker_threads=1"]
    env = {**os.environ, "CHATLOOP_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert set(result["specs"]) == {"hf", "inprocess", "chatloop"}
    assert result["specs"]["inprocess"]["config"]["cluster"]["num_workers"] == 1  # the sweep's baseline adjustments
    assert result["specs"]["chatloop"]["config"]["cluster"]["num_workers"] == 2
    assert len(result["rounds"]) == 2
    modes = [[key for key in row if key in result["specs"]] for row in result["rounds"]]
    for row in result["rounds"]:
        assert set(row) == {"hf", "inprocess", "chatloop", "load_avg_1m"}  # the machine's load, beside each round
        for mode in result["specs"]:
            assert row[mode]["tokens"] == 2 * 3 and row[mode]["decode_tokens_per_s"] > 0
    assert modes == [["hf", "inprocess", "chatloop"], ["inprocess", "chatloop", "hf"]]  # the order rotates
    ratio = result["ratios"]["chatloop/inprocess"]["decode_tokens_per_s"]
    within = [r["chatloop"]["decode_tokens_per_s"] / r["inprocess"]["decode_tokens_per_s"] for r in result["rounds"]]
    assert ratio["median"] == pytest.approx(statistics.median(within))
    assert set(result["ratios"]) == {"inprocess/hf", "chatloop/hf", "chatloop/inprocess"}
    assert "2 workers / 1 process: decode" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [(["--modes", "chatloop"], "give two or more of"), (["--modes", "hf,gpu"], "give two or more of"),
     (["--rounds", "0"], "--rounds 0: need >= 1")],
)
def test_paired_refuses_bad_arguments_and_says_what_to_give(args, message):
    command = [sys.executable, "-m", "benchmarks.paired", *args]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_paired_names_the_contender_that_cannot_load(tmp_path):
    from benchmarks.checkpoints import SHAPES, write_random_checkpoint

    checkpoint = write_random_checkpoint(SHAPES["tiny"], tmp_path / "random-tiny", dtype="float32")
    command = [sys.executable, "-m", "benchmarks.paired", "--modes", "inprocess,chatloop", f"model.name={checkpoint}",
               "model.dtype=float32", "benchmark.num_requests=64", "benchmark.prompt_tokens=500", "cache.kv_cache_mb=1"]
    env = {**os.environ, "CHATLOOP_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert ("paired: inprocess: ValueError: the KV cache holds" in proc.stderr
            and "raise cache.kv_cache_mb" in proc.stderr)


def test_paired_offers_llama_server_the_same_load_on_the_same_gguf(llamacpp_build, tmp_path, smollm2_checkpoint):
    out = tmp_path / "paired.json"
    command = [sys.executable, "-m", "benchmarks.paired", "--modes", "llamacpp,inprocess", "--rounds", "1",
               "--json", str(out), "model.quantization=gguf", "batching.max_batch_size=2", "benchmark.num_requests=2",
               "benchmark.prompt_tokens=8", "benchmark.new_tokens=4", "benchmark.timeout_s=300", "cache.kv_cache_mb=16"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    (row,) = result["rounds"]
    assert row["llamacpp"]["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"  # the embedded file, as ChatLoop's source
    for mode in ("llamacpp", "inprocess"):
        assert row[mode]["tokens"] == 2 * 4 and row[mode]["decode_tokens_per_s"] > 0
    assert set(result["ratios"]) == {"inprocess/llamacpp"}
