"""The OpenAPI schema tells the truth: schemathesis sends what the schema allows (and what it forbids) to every
route of a real server, and every answer must match the schema (streams included, event by event), be a
documented status, and never be a 5xx; a request the schema allows must be served (ST202), one it forbids
refused (ST201).

The server runs a tiny random Llama with SmolLM2's tokenizer and a 96-token context, so that the
generations schemathesis asks for stay small. A toy API whose schema lies shows that the same fuzzing fails.
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import FailureGroup

from chatloop import ChatLoop, load_config
from chatloop.partition import split_model
from chatloop.serving import create_app

pytestmark = pytest.mark.slow

CONTEXT = 96
EXAMPLES = 60
"""Requests per route and mode: about a minute for the whole module on 2 cores."""

load_all_checks()
_BUILTIN = {check.__name__: check for check in CHECKS.get_all()}


def _error_code(response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def positive_data_acceptance_within_context(ctx, response, case):
    """positive_data_acceptance (ST202), except for a prompt too long for the context (413) or a max_tokens beyond
    what the prompt leaves of it (400), both with code context_length_exceeded: they depend on how the text
    tokenizes, which no schema can state."""
    if response.status_code in (400, 413) and _error_code(response) == "context_length_exceeded":
        return None
    return _BUILTIN["positive_data_acceptance"](ctx, response, case)


CHECKED = [positive_data_acceptance_within_context if check.__name__ == "positive_data_acceptance" else check
           for check in _BUILTIN.values()]
"""Every check schemathesis has (``--checks all``), positive_data_acceptance with the one exception above."""


def fuzz(operation, mode: GenerationMode, max_examples: int = EXAMPLES) -> None:
    """Send ``max_examples`` requests of ``mode`` to ``operation``; the first failing check raises."""

    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        case.call_and_validate(checks=CHECKED)

    check()


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
WITH_INPUT = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
"""The routes whose input a schema can forbid (the others take none, or a path any string fits)."""


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    return schemathesis.openapi.from_asgi("/openapi.json", tiny_server)


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(ROUTES)


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_serves_what_its_schema_allows(api_schema, method, path):
    fuzz(api_schema[path][method], GenerationMode.POSITIVE)


@pytest.mark.parametrize("method, path", WITH_INPUT)
def test_every_route_refuses_what_its_schema_forbids(api_schema, method, path):
    fuzz(api_schema[path][method], GenerationMode.NEGATIVE)


STREAMED = {
    "/v1/completions": {"prompt": "Once upon a time", "max_tokens": 4, "logprobs": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
                             "top_logprobs": 2},
}


@pytest.mark.parametrize("path", STREAMED)
def test_streams_are_server_sent_events_as_the_schema_says(api_schema, path):
    content = api_schema.raw_schema["paths"][path]["post"]["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/event-stream"}
    # Every event of a stream with every kind of chunk (role, text, logprobs, finish, usage) against its schema.
    body = {"model": api_schema.raw_schema["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
            ["enum"][0], "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            **STREAMED[path]}
    response = api_schema[path]["POST"].Case(body=body).call_and_validate(checks=CHECKED)
    assert response.headers["content-type"][0].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"usage"' in events[-2] and len(events) >= 6


# ---- the fuzzing can fail ----------------------------------------------------------------------------------
class _Number(BaseModel):
    n: int


def _liar() -> FastAPI:
    """An API whose schema lies twice: it refuses every body its schema allows, and its stream's events are not the
    string its schema says."""
    app = FastAPI()

    @app.post("/refuses", responses={400: {"description": "Always"}})
    async def refuses(body: _Number) -> JSONResponse:
        return JSONResponse({"error": {"message": "no", "code": "invalid_value"}}, status_code=400)

    @app.get("/streams", responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def streams() -> StreamingResponse:
        return StreamingResponse(iter(["data: {}\n\n"]), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("method, path, code", [("POST", "/refuses", "ST202"), ("GET", "/streams", "ST108")])
def test_the_fuzzing_fails_on_a_schema_that_lies(method, path, code):
    schema = schemathesis.openapi.from_asgi("/openapi.json", _liar())
    with pytest.raises(FailureGroup) as failed:
        fuzz(schema[path][method], GenerationMode.POSITIVE, max_examples=5)
    assert code in {failure.code for failure in failed.value.exceptions}, failed.value
