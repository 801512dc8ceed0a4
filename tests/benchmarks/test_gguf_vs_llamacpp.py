"""ChatLoop on GGUF files made by llama.cpp's own converter and quantizer (``benchmarks.gguf_files``), as users
download them: prompt log-probabilities over HTTP equal transformers' on the same file (dequantized, float32), and
the perplexity equals llama-perplexity's on the same chunks (issue 21, point 6).

Skipped, saying how to build it, without llama.cpp's build and its ``llama-quantize``."""

from __future__ import annotations

import pytest

from benchmarks.perplexity import DEFAULT_TEXT, SHORT_TEXT


@pytest.fixture
def quantizer():
    from benchmarks.gguf_files import quantize_missing

    problem = quantize_missing()
    if problem:
        pytest.skip(problem)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K_M"])
def test_prompt_logprobs_over_http_equal_transformers_on_the_same_file(kind, quantizer, smollm2_checkpoint):
    from benchmarks.gguf_accuracy import compare_logprobs
    from benchmarks.gguf_files import gguf_file, tensor_types

    path = gguf_file(kind)
    if kind == "Q4_K_M":  # what llama-quantize writes for SmolLM2's rows of 576 and 1536
        assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(tensor_types(path))
    result = compare_logprobs(path, ["cache.kv_cache_mb=32"], count=2, length=160, text=DEFAULT_TEXT)
    assert result["tokens_compared"] == 2 * 159
    assert result["max_abs_diff"] < 5e-3, result


@pytest.mark.slow
def test_perplexity_of_a_q4_k_m_file_equals_llama_perplexity(quantizer, smollm2_checkpoint):
    from benchmarks.gguf_accuracy import run_perplexity
    from benchmarks.gguf_files import gguf_file

    result = run_perplexity(gguf_file("Q4_K_M"), 128, SHORT_TEXT)
    assert result["protocol"] == "llama-perplexity" and result["llamacpp_gguf"].endswith("Q4_K_M.gguf")
    assert abs(result["relative_to_llamacpp"]) < 0.005, result
