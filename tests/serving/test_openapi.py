"""The OpenAPI schema tells the truth: schemathesis sends what the schema allows (and what it forbids) to every
route of a real server, and every answer must match the schema, be a documented status, and never be a 5xx.

The server runs a tiny random Llama with SmolLM2's tokenizer and a 96-token context, so that the
generations schemathesis asks for stay small.
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CHECKS

from chatloop import ChatLoop, load_config
from chatloop.partition import split_model
from chatloop.serving import create_app

pytestmark = pytest.mark.slow

CONTEXT = 96
# Every check but the one that wants every schema-valid request accepted: a prompt that the schema
# allows can still be longer than the context in tokens (413), which no schema can state.
CHECKED = [check for check in CHECKS.get_all() if check.__name__ != "positive_data_acceptance"]


@pytest.fixture(scope="module")
def tiny_server(smollm2_checkpoint, tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2_checkpoint / name).is_file():
            shutil.copy(smollm2_checkpoint / name, folder / name)
    parts = folder / "parts"
    split_model(folder, parts, 1, progress=False)
    cfg = load_config(["cluster=single", "cluster.num_workers=1", f"model.name={folder}",
                       f"model.partitions_dir={parts}", "cache.kv_cache_mb=4", "cache.min_capacity_tokens=64"])
    with ChatLoop.start(cfg) as llm:
        yield create_app(llm, cfg)


ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/v1/models/{model}"), ("GET", "/v1/status"), ("GET", "/health"), ("GET", "/metrics")]


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    return schemathesis.openapi.from_asgi("/openapi.json", tiny_server)


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(ROUTES)


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_answers_as_its_schema_says(api_schema, method, path):
    operation = api_schema[path][method]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def check(case) -> None:
        case.call_and_validate(checks=CHECKED)

    check()
