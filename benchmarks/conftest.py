"""Fixtures of the micro-benchmarks: SmolLM2's partitions, a tiny random checkpoint, the machine's bandwidth.

``note(benchmark)`` repeats a benchmark's ``extra_info`` (roofline fraction, per-hop cost, MB/s)
in a section at the end of pytest's output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

_NOTES: list[str] = []


@pytest.fixture
def note(request) -> Callable:
    """``note(benchmark)``: show this benchmark's ``extra_info`` in the summary at the end."""

    def add(benchmark) -> None:
        if benchmark.extra_info:
            _NOTES.append(f"{request.node.name}: " + ", ".join(f"{k}={v}" for k, v in benchmark.extra_info.items()))

    return add


def pytest_terminal_summary(terminalreporter) -> None:
    if _NOTES:
        terminalreporter.section("benchmark notes (extra_info; --benchmark-json keeps them)")
        for line in _NOTES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def smollm2_partitions() -> Callable[[int], Path]:
    """``smollm2_partitions(n)``: the folder of SmolLM2 split into ``n`` partitions (ChatLoop's cache, split once)."""
    from chatloop import load_config
    from chatloop.api import partitions_dir_for, prepare_partitions

    def get(num: int) -> Path:
        cfg = load_config([f"cluster.num_workers={num}"])
        prepare_partitions(cfg)
        return partitions_dir_for(cfg)

    return get


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory) -> Path:
    """A random-weight Llama of the ``tiny`` shape (benchmarks/checkpoints.py), float32."""
    from benchmarks.checkpoints import SHAPES, write_random_checkpoint

    return write_random_checkpoint(SHAPES["tiny"], tmp_path_factory.mktemp("random-tiny"), dtype="float32")


@pytest.fixture(scope="session")
def bandwidth_gbs() -> float:
    """This machine's read bandwidth in GB/s (sum of a 512 MiB tensor, torch's default threads)."""
    from benchmarks.measure import memory_bandwidth

    return memory_bandwidth(512)["read_gbs"]
