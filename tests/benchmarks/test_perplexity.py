"""benchmarks.perplexity: its windows, and its figure over the pipeline against transformers' on the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.perplexity import DEFAULT_TEXT, perplexity, windows
from chatloop.network import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_windows_predict_each_token_once():
    plan = windows(10, 4, 2)
    assert plan == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert [t for _, end, first in plan for t in range(first, end)] == list(range(1, 10))
    assert windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 9, 9)]  # a window's first token has no context in it
    with pytest.raises(ValueError, match="1 <= stride <= window"):
        windows(10, 4, 5)


def test_perplexity_with_toy_scores():
    # Every token predicted with probability 1/4: perplexity 4, whatever the windows.
    value, count = perplexity(lambda batch: [[-1.3862943611198906] * (len(ids) - 1) for ids in batch],
                              list(range(50)), 8, 3)
    assert count == 49 and value == pytest.approx(4.0)


@pytest.mark.slow
def test_the_command_over_two_workers_equals_transformers(smollm2_checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.perplexity", "--window", "256", "--stride", "128", "--transformers",
         "cluster.num_workers=2", "cache.kv_cache_mb=64", f"cluster.master_port={free_port()}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["text"] == DEFAULT_TEXT.name and result["predicted"] == result["tokens"] - 1 > 600
    assert abs(result["relative_difference"]) < 1e-4, result
    assert 1 < result["perplexity"] < 100
