"""Greedy text of every family beside Llama through real worker processes equals transformers' (issue 20, point 4).

Each case splits one tiny random checkpoint (tests/conftest.py: ``TINY_FAMILY_CONFIGS`` and ``TINY_MOE_VARIANTS``)
over 2 or 4 worker ranks started by a coordinator process (cluster_harness.py), sends three prompts of different
lengths at once, so that prefill and decode run batched (two micro-batches in flight, one of two sequences) through
the pipeline, and compares each request's greedy tokens and their log-probabilities with transformers' ``generate``
on the same weights, one prompt at a time. Gemma 2 and 3 have windows of 8 and Phi-3 one of 24: the longest prompt
with its continuation crosses them; Phi-3's longrope switches to its long factors at position 16, where
transformers' ``generate`` computes the sequence again (as the scheduler's ``rope_switch`` does).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from cluster_harness import run_cluster

from tests.conftest import TINY_FAMILY_CONFIGS, save_tiny_tokenizer

FAMILIES = [*TINY_FAMILY_CONFIGS, "qwen3_moe", "mixtral"]
CASES = [(family, 4) for family in FAMILIES] + [(family, 2) for family in ("qwen3_moe", "mixtral", "qwen3")]
PROMPTS = {  # different lengths; the longest is past gemma's window before it decodes
    "short": [124, 112, 123, 110, 9],
    "middle": [99, 59, 62, 85, 50, 102, 28, 14, 64],
    "long": [8, 1, 77, 12, 45, 100, 6, 29, 81, 14, 3, 66, 97],
}
NEW_TOKENS = 20  # the long prompt ends at 33: past phi3's window (24), within its 64 positions
# transformers' top logit beats its second by this much at every step of every case (the prompts were picked so):
# float32 logits a few 1e-5 apart cannot swap them, so a different token is a bug, not rounding
MARGIN = 5e-4
LOGPROB_TOLERANCE = 1e-4  # test_golden's logit tolerance: the tokens' log-probabilities are compared too


def transformers_greedy(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of ``prompt`` and each token's log-probability, checked to be no coin toss
    between two tokens."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for step, scores in enumerate(out.scores):
        top2 = scores[0].float().topk(2).values
        assert top2[0] - top2[1] > MARGIN, f"a near-tie at step {step}: pick other prompts or seeds"
    tokens = out.sequences[0, len(prompt):]
    logprobs = [torch.log_softmax(scores[0].float(), -1)[t].item() for scores, t in zip(out.scores, tokens)]
    return tokens.tolist(), logprobs


@pytest.mark.slow
@pytest.mark.parametrize(("family", "num_workers"), CASES, ids=[f"{f}-{n}workers" for f, n in CASES])
def test_batched_greedy_tokens_through_worker_ranks_equal_transformers_generate(family, num_workers,
                                                                                   tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    assert checkpoint.num_layers >= num_workers
    config = checkpoint.model.config
    window = getattr(config, "sliding_window", None)
    if family in ("gemma2", "gemma3_text", "phi3"):  # the windows are crossed, or they are not tested
        assert window and max(map(len, PROMPTS.values())) + NEW_TOKENS > window
    if family == "phi3":  # every sequence crosses longrope's switch as it decodes
        assert max(map(len, PROMPTS.values())) <= config.original_max_position_embeddings == 16
    folder = tmp_path / family
    shutil.copytree(checkpoint.path, folder)
    save_tiny_tokenizer(folder)
    expected = {name: transformers_greedy(checkpoint.model, prompt) for name, prompt in PROMPTS.items()}
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    requests = [{"prompt": prompt, "params": params} for prompt in PROMPTS.values()]
    results = run_cluster(  # two micro-batches in flight: of two sequences and of one, however many workers
        [f"model.name={folder}", f"model.partitions_dir={tmp_path / 'parts'}", f"cluster.num_workers={num_workers}",
         "cluster.max_in_flight=2"],
        [{"name": "batch", "op": "streams", "requests": requests},  # all at once
         {"name": "stages", "op": "describe"}],
    )
    # Gemma's windowed layers keep their blocks in a pool of their own (issue 20 point 3), sized by every worker:
    # the window tables travel with each micro-batch, and the goldens below hold through them.
    windowed_pools = [r["num_window_blocks"] for r in results["stages"] if r["num_window_blocks"]]
    assert bool(windowed_pools) == (family in ("gemma2", "gemma3_text")), results["stages"]
    for name, result in zip(PROMPTS, results["batch"]):
        assert result["error"] is None, (name, result["error"])
        tokens, logprobs = expected[name]
        assert result["token_ids"] == tokens, name
        assert result["logprobs"] == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE), name
