"""benchmarks.moe on a tiny shape (8 experts, 2 a token): the GGUF it writes, the bytes a token reads, and its
commands end to end (the workers' run, the paired run against llama-server where there is a build)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    from benchmarks.moe import TINY, gguf_file

    return gguf_file(TINY, folder=tmp_path_factory.mktemp("moe"))


def test_the_file_holds_the_shape_and_a_token_reads_top_k_of_the_experts(tiny_moe):
    import gguf

    from benchmarks.gguf_files import bytes_per_token
    from benchmarks.moe import TINY, active_bytes, file_bytes

    reader = gguf.GGUFReader(tiny_moe)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (TINY.experts, TINY.expert_ff, TINY.hidden)
    assert shapes["blk.0.ffn_down_exps.weight"] == (TINY.experts, TINY.hidden, TINY.expert_ff)
    assert shapes["blk.0.attn_q.weight"] == (TINY.heads * TINY.head_dim, TINY.hidden)
    assert reader.fields["qwen3moe.expert_used_count"].contents() == TINY.top_k
    assert sum(int(t.n_bytes) for t in reader.tensors) == file_bytes(TINY)
    active = active_bytes(tiny_moe)
    assert active["experts"] * TINY.experts == active["all_experts"] * TINY.top_k
    assert active["total"] == bytes_per_token(tiny_moe)  # paired's roofline counts the same bytes
    assert active["total"] < file_bytes(TINY) / 2


def test_a_decode_step_reads_its_active_weights_and_no_other_expert(tiny_moe, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATLOOP_CACHE", str(tmp_path))
    from benchmarks.moe import _config, active_bytes, stage_bytes

    rows = stage_bytes(_config(tiny_moe, 2, []), steps=2)
    assert [r["layers"] for r in rows] == [[0], [1]]
    read = sum(r["bytes_per_step"] for r in rows)
    # The embedding's one row is all the step reads beyond the active weights; all 8 experts would be ~2.4x.
    assert 1.0 <= read / active_bytes(tiny_moe)["total"] < 1.01


def _run(command: list[str], tmp_path: Path, timeout: int) -> dict:
    env = {**os.environ, "CHATLOOP_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.moe", *command, "--tiny", "--layers", "2", "--workers",
                           "2", "--prompt-tokens", "8", "--new-tokens", "4", "--kv-cache-mb", "8",
                           "--bandwidth-mb", "64", "--json", str(out), "worker.worker_threads=1",
                           "benchmark.timeout_s=150"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_workers_give_decode_speed_roofline_and_each_workers_rss_budget(tmp_path):
    result = _run(["workers"], tmp_path, 300)
    row = result["workers"]
    assert row["decode_tokens_per_s"] > 0
    assert row["fraction_of_roofline"] == pytest.approx(
        row["decode_tokens_per_s"] * result["active_bytes"]["total"] / (row["bandwidth_gbs"] * 1e9))
    assert len(row["stages"]) == 2
    for stage in row["stages"]:
        assert stage["rss_budget_bytes"] == stage["partition_bytes"] + stage["kv_cache_bytes"] + 500 * 2**20
        assert stage["rss_within_budget"] == (stage["rss_bytes"] <= stage["rss_budget_bytes"])


@pytest.mark.slow
def test_paired_runs_chatloop_and_llama_server_on_the_same_file(llamacpp_build, tmp_path):
    result = _run(["paired", "--rounds", "1"], tmp_path, 400)
    paired = result["paired"]
    for mode in ("llamacpp", "chatloop"):
        assert paired["specs"][mode]["config"]["model"]["name"] == result["file"]
        assert paired["rounds"][0][mode]["decode_tokens_per_s"] > 0
    assert paired["specs"]["llamacpp"]["benchmark"]["gguf"] == result["file"]
    assert paired["weight_bytes_per_token"] == result["active_bytes"]["total"]
    assert "chatloop/llamacpp" in paired["ratios"]
