"""The OpenAI wire format: request bodies (validated by pydantic) and the responses and stream chunks.

Requests are strict about types (``"0.5"`` is not a number; ``2.0`` is the integer 2, as JSON Schema
reads it) and ignore fields they do not know. Supported beyond OpenAI's fields, as vLLM does: ``top_k``,
``repetition_penalty``, ``ignore_eos``; and ``speculative_method`` and ``speculative_tokens`` (speculative
decoding). Fields ChatLoop cannot honour (``n > 1``, penalties, a non-empty ``suffix``, ``best_of > 1``, ``echo``
with ``stream``, content parts other than text) are refused with a 400 saying so, rather than silently ignored.

The OpenAPI schema states every rule the server enforces, so that a request the schema allows is
served. Rules pydantic cannot check with a clear message (a field that depends on another, an
unsupported value) are written into the schema here (:func:`_when`, ``json_schema_extra``) and
checked by :class:`~chatloop.serving.completions.CompletionService`, whose 400 names the field and
what to change. Only what depends on tokens (a prompt too long for the context) is beyond a schema.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ..engine.requests import (
    GREEDY_BELOW,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_SPECULATIVE_TOKENS,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
)

__all__ = [
    "StreamOptions", "CompletionRequest", "ChatMessage", "ChatCompletionRequest", "Usage", "CompletionLogprobs",
    "ChatLogprobs", "CompletionResponse", "CompletionChunk", "ChatCompletionResponse", "ChatCompletionChunk",
    "ErrorResponse", "HealthResponse", "ModelCard", "ModelList",
    "new_id", "completion_response", "completion_chunk", "chat_response", "chat_chunk", "usage", "usage_chunk",
]


def _integral(value: Any, depth: int = 2) -> Any:
    """A float with no fractional part (``2444.0``) as the integer it is, also inside lists (``depth`` deep: a
    prompt of token ids); JSON Schema's ``integer`` allows it, and a float field takes an integer anyway."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list) and depth > 0:
        return [_integral(item, depth - 1) for item in value]
    return value


class _Body(BaseModel):
    """A request body: strict types, unknown fields ignored, integral floats read as integers (``2.0`` is 2)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        # Here rather than a validator on each integer: one there would hide its bounds from the JSON schema.
        return {key: _integral(value) for key, value in data.items()} if isinstance(data, dict) else data


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk with ``usage`` and no choices before ``[DONE]``."""


NonEmpty = Annotated[str, StringConstraints(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _when(condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema rule between fields: a body whose fields match ``condition`` (each one present) must match
    ``then`` (``properties`` and ``required`` of the body)."""
    return {"if": {"properties": condition, "required": list(condition)}, "then": then}


class _Sampling(_Body):
    """The fields both endpoints share. Bounds are stated here, so the schema says what the server enforces."""

    model: str = Field(description="The model id, as listed by GET /v1/models.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; the prompt plus this must fit the context.")
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
        description=f"0 (default) is greedy, as is anything below {GREEDY_BELOW:g}; up to {MAX_TEMPERATURE:g}.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False,
                                description="Nucleus sampling, in (0, 1]; the most likely token is always kept.")
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = Field(False, description="Send Server-Sent Events (chunks), ending with 'data: [DONE]'.")
    stream_options: StreamOptions | None = None
    stop: NonEmpty | Annotated[list[NonEmpty], Field(max_length=4)] | None = Field(
        None, description="Up to 4 non-empty strings; generation stops before them (they are not returned).")
    seed: int | None = Field(None, description="Same seed, same sampled output.")
    presence_penalty: float | None = Field(None, ge=0, le=0,
                                           description="Only 0 is supported (see repetition_penalty).")
    frequency_penalty: float | None = Field(None, ge=0, le=0,
                                            description="Only 0 is supported (see repetition_penalty).")
    user: str | None = None
    top_k: int | None = Field(None, ge=0, description="Extension: keep the k most likely tokens (0: all).")
    repetition_penalty: float | None = Field(
        None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, allow_inf_nan=False,
        description=f"Extension: > 1 discourages repeated tokens, < 1 encourages them; {MIN_REPETITION_PENALTY:g} to "
                    f"{MAX_REPETITION_PENALTY:g}, 1 disables it.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    speculative_method: Literal["ngram", "draft", "off"] | None = Field(
        None, description="Extension: speculative decoding for this request: ngram (look the next tokens up in the "
                          "prompt and output), draft (the server's draft model, where it has one) or off; null: the "
                          "server's speculative.method.")
    speculative_tokens: int | None = Field(
        None, ge=0, le=MAX_SPECULATIVE_TOKENS,
        description=f"Extension: the most tokens drafted at a step, 1 to {MAX_SPECULATIVE_TOKENS} (0: no "
                    "speculation); null: the server's speculative.num_tokens.")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        # max_tokens=0 only scores the prompt: the scores are what it returns.
        _when({"max_tokens": {"const": 0}}, {"properties": {"echo": {"const": True}, "logprobs": {"type": "integer"}},
                                             "required": ["echo", "logprobs"]}),
        _when({"stream": {"const": True}}, {"properties": {"echo": {"const": False}}}),
    ]})

    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=1)] = Field(
        description="Text, or token ids; a list of one prompt is accepted (batches are not). Not empty."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Most tokens to generate; the prompt plus this must fit the context. 0 (with echo "
                                "and logprobs): score the prompt, generate nothing.")
    echo: bool = Field(False, description="Return the prompt before the completion (with logprobs: the prompt "
                                          "tokens' too, the first one's null). Not with stream.")
    suffix: str | None = Field(None, description="Not supported: leave it out (or empty).",
                               json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return each token's log-probability with this many most likely alternatives "
                                      "(0 to 5); the model's own, whatever the sampling settings.")


class _ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str = Field(description="Only text parts are read.", json_schema_extra={"const": "text"})
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: NonEmpty = Field(description="system, user, assistant (or what the model's chat template knows).")
    content: str | list[_ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        _when({"top_logprobs": {"type": "integer"}}, {"properties": {"logprobs": {"const": True}},
                                                      "required": ["logprobs"]}),
    ]})

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far (at least one message).")
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
    logprobs: bool | None = Field(None, description="Return each generated token's log-probability (the model's "
                                                     "own, whatever the sampling settings).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description=f"With logprobs: true, this many most likely alternatives (0 to "
                                                 f"{MAX_LOGPROBS}) at each token.")


# ---- responses (documented in the OpenAPI schema; built as dicts) ------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose keys and values came from the prefix cache.")


class CompletionTokensDetails(BaseModel):
    accepted_prediction_tokens: int = Field(description="Speculative decoding: drafted tokens the model accepted.")
    rejected_prediction_tokens: int = Field(description="Speculative decoding: drafted tokens the model rejected.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class _Choice(BaseModel):
    index: int
    finish_reason: Literal["stop", "length"] | None


class _Response(BaseModel):
    id: str
    created: int
    model: str


class CompletionLogprobs(BaseModel):
    """One entry per token: its text, log-probability (null for an echoed prompt's first token), the most likely
    alternatives and the token itself as {text: log-probability}, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class _TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[_TokenLogprob]


class CompletionResponse(_Response):
    object: Literal["text_completion"]
    choices: list[_CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(CompletionResponse):
    """One event of a streamed completion: a piece of text; with stream_options.include_usage the last one has
    no choices and the usage."""


class _AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class _ChatChoice(_Choice):
    message: _AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"]
    choices: list[_ChatChoice]
    usage: Usage


class _Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class _ChatChunkChoice(_Choice):
    delta: _Delta
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    """One event of a streamed chat answer: the role first, then pieces of text; with
    stream_options.include_usage the last one has no choices and the usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[_ChatChunkChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's error object."""

    error: ErrorDetail


class StageHealth(BaseModel):
    name: str
    up: bool
    error: str | None = None


class HealthResponse(BaseModel):
    """GET /health: 'ok' with 200 when every stage makes progress, else 'unavailable' with 503."""

    status: Literal["ok", "unavailable"]
    down: list[str]
    stages: list[StageHealth]
    checked_at: float


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
          drafted_tokens: int | None = None, accepted_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` where the engine told (prefix caching), and
    ``completion_tokens_details``' accepted and rejected prediction tokens where the request speculated."""
    use: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        use["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if drafted_tokens is not None:
        accepted = accepted_tokens or 0
        use["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted_tokens - accepted}
    return use


def _head(id_: str, object_: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": id_, "object": object_, "created": created or int(time.time()), "model": model}


def completion_response(id_: str, model: str, text: str, finish_reason: str, use: dict,
                        logprobs: dict | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_head(id_, "text_completion", model, None), "choices": [choice], "usage": use}


def completion_chunk(id_: str, model: str, created: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_head(id_, "text_completion", model, created), "choices": [choice]}


def chat_response(id_: str, model: str, text: str, finish_reason: str, use: dict,
                  logprobs: dict | None = None) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": finish_reason}
    return {**_head(id_, "chat.completion", model, None), "choices": [choice], "usage": use}


def chat_chunk(id_: str, model: str, created: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_head(id_, "chat.completion.chunk", model, created), "choices": [choice]}


def usage_chunk(id_: str, object_: str, model: str, created: int, use: dict) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {**_head(id_, object_, model, created), "choices": [], "usage": use}
