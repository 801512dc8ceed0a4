"""benchmarks/speculation.py runs end to end on a small load: every mode, greedy answers equal, the figures written."""

from __future__ import annotations

import json


def test_speculation_benchmark_measures_every_mode_and_writes_its_figures(smollm2_split, tmp_path):
    from benchmarks.speculation import main

    out = tmp_path / "speculation.json"
    assert main(["--rounds", "1", "--ks", "2", "--ngram-ks", "3", "--tokens", "6", "--json", str(out),
                 "cluster=single", f"model.partitions_dir={smollm2_split}", "cache.kv_cache_mb=32",
                 "speculative.draft_quantization=null"]) == 0
    result = json.loads(out.read_text())
    assert set(result["rounds"][0]) == {"draft_k2", "ngram_k3"}
    summary = result["summary"]
    assert summary["draft_k2"]["speedup_median"] > 0 and summary["draft_k2"]["off_decode_tokens_per_s"] > 0
    # The model itself (float32) as its own draft: every draft accepted, 3 tokens a pass but for the last.
    assert summary["draft_k2"]["acceptance"] == 1 and summary["draft_k2"]["tokens_per_pass"] > 2
    assert result["rounds"][0]["ngram_k3"]["drafted"] > 0 and summary["ngram_k3"]["decode_tokens_per_s"] > 0
    assert result["command"].startswith("python -m benchmarks.speculation")
