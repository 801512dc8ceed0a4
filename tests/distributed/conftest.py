"""Fixtures for tests with real ranks on loopback."""

from __future__ import annotations

import pytest
from cluster_harness import CHAT_PROMPT, PLAIN_PROMPT


@pytest.fixture(scope="session")
def hf_greedy():
    """transformers' own greedy generate() on the embedded SmolLM2: the reference token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatloop.embedded import embedded_checkpoint

    folder = embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare all 32 tokens, as ChatLoop with ignore_eos

    def greedy(prompt_ids: list[int], n: int = 32) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    def encode_chat(messages) -> list[int]:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    return {
        "plain": greedy(tokenizer.encode(PLAIN_PROMPT)),
        "chat": greedy(encode_chat(CHAT_PROMPT)),
    }
