"""benchmarks/prefix_cache.py runs end to end on a small load: both modes, equal answers, the figures written."""

from __future__ import annotations

import json


def test_prefix_cache_benchmark_measures_both_modes_and_writes_its_figures(smollm2_split, tmp_path):
    from benchmarks.prefix_cache import main

    out = tmp_path / "prefix.json"
    assert main(["--rounds", "1", "--turns", "2", "--user-tokens", "30", "--answer-tokens", "3", "--chats", "2",
                 "--json", str(out), "cluster=single", f"model.partitions_dir={smollm2_split}",
                 "cache.kv_cache_mb=32"]) == 0
    result = json.loads(out.read_text())
    assert set(result["rounds"][0]) == {"single_on", "single_off", "batch_on", "batch_off"}
    for kind in ("single", "batch"):
        summary = result["summary"][kind]
        assert summary["hit_rate"] > 0 and summary["last_turn_ttft_on_s"] > 0 and summary["tokens_per_s_off"] > 0
    assert result["rounds"][0]["batch_off"]["cached_tokens"] == 0 and result["command"].startswith("python -m")
