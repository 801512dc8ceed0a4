"""benchmarks/window_attention.py runs end to end on a small shape: both paths, checked equal, timed, in its three
cases (every layer windowed; a windowed layer beside full ones in one pool and in its own)."""

from __future__ import annotations

import pytest

from chatloop.kernels import load_kernels


def test_window_attention_benchmark_checks_and_times_both_paths(capsys):
    if load_kernels() is None:
        pytest.skip("ChatLoop's native kernels cannot be built here")
    from benchmarks.window_attention import main

    main(["--rounds", "2", "--calls", "1", "--batch", "2", "--context", "50", "--window", "9", "--shape", "4,2,16",
          "--block-size", "4"])
    out = capsys.readouterr().out
    assert out.count("gathered/kernel median") == 3 and "Mistral" in out
    assert "Gemma, one pool" in out and "Gemma, own pool" in out
