"""The benchmark tooling's tests import ``benchmarks`` from the repository root (it is not installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def llamacpp_build() -> Path:
    """The llama.cpp build (``benchmarks/build_llamacpp.sh``); the test is skipped, saying how to make one, without."""
    from benchmarks.llamacpp import llamacpp_dir, llamacpp_missing

    problem = llamacpp_missing()
    if problem:
        pytest.skip(problem)
    return llamacpp_dir()
