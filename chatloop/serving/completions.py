"""POST /v1/completions and /v1/chat/completions: validate, submit, answer (JSON or Server-Sent Events).

A request is checked before it reaches the scheduler (model, unsupported fields, prompt and
max_tokens against the context, sampling values), so every bad request gets a 4xx that says
what to change. Admission is the scheduler's: a full queue is a 429 with ``Retry-After``.
A streamed answer waits for the first event before it sends its headers, so a request that
fails at once still gets a proper status code; a failure after that ends the stream with
``data: {"error": {...}}`` and ``data: [DONE]``. A client that goes away cancels its sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from ..config import ChatLoopConfig
from ..engine import (
    ClusterUnavailableError,
    ContextLengthError,
    DeadlineExceededError,
    EngineClient,
    FaultKind,
    FinishReason,
    QueueFullError,
    RequestError,
    SamplingParams,
    SchedulerClosedError,
    ScoredToken,
    SequenceEvent,
    StageError,
    first_line,
)
from . import protocol as p
from .bridge import ClientDisconnected, EventStream
from .errors import APIError
from .health import HealthMonitor
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import ServerMetrics

__all__ = ["CompletionService", "SSEResponse"]

log = logging.getLogger(__name__)

ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions"}
"""Paths whose outcomes chatloop_requests_total counts, and their ``endpoint`` label."""

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions."""

Body = p.CompletionRequest | p.ChatCompletionRequest


class SSEResponse(StreamingResponse):
    """Server-Sent Events; ``on_close`` runs however the response ends (done, client gone, error)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover - already closed or running elsewhere
                pass
            self._on_close()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class CompletionService:
    """Turns OpenAI requests into scheduler submissions and events into OpenAI answers."""

    def __init__(
        self, engine: EngineClient, cfg: ChatLoopConfig, model_name: str, metrics: ServerMetrics, health: HealthMonitor
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.model_name = model_name
        self.metrics = metrics
        self.health = health
        self.context_tokens = engine.context_length
        self.vocab_size = engine.vocab_size
        self.stage_names = engine.stage_names

    # ---- entry point -----------------------------------------------------------------------
    async def handle(self, endpoint: str, body: Body, request: Request) -> Response:
        chat = isinstance(body, p.ChatCompletionRequest)
        if body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} does not exist here: use {self.model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found")
        self._refuse_unsupported(body)
        # Tokenizing is CPU work (seconds for megabytes): off the event loop, which health probes share.
        prompt_ids = await (self._encode_chat(body) if chat else self._encode_prompt(body))  # type: ignore[arg-type]
        params = self._params(body, len(prompt_ids), chat)
        echo = self._echo_text(body, prompt_ids) if not chat and body.echo else None  # type: ignore[union-attr]
        down = self.health.down_now
        if down is not None:
            raise APIError(503, f"stage(s) down: {down.summary()}: the request was not run (chatloop-status shows "
                                "every rank)", code="stage_unavailable", headers={"Retry-After": "5"})
        stream = self._submit(prompt_ids, params)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        id_ = p.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return await self._stream(endpoint, body, request, stream, id_, len(prompt_ids), chat)
        return await self._collect(endpoint, body, request, stream, id_, prompt_ids, echo)

    # ---- checks --------------------------------------------------------------------------------
    def _refuse_unsupported(self, body: Body) -> None:
        """The rules the schema states but pydantic does not check (protocol's ``_when`` rules, ``suffix``)."""
        if isinstance(body, p.CompletionRequest):
            if body.echo and body.stream:
                raise APIError(400, "echo is not supported with stream: leave one out", param="echo",
                               code="unsupported")
            if body.suffix:  # "" is no suffix
                raise APIError(400, "suffix is not supported by ChatLoop: leave it out (or send it empty)",
                               param="suffix", code="unsupported")
        elif body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true: send both, or leave top_logprobs out",
                           param="top_logprobs", code="invalid_value")

    def _echo_text(self, body: p.CompletionRequest, prompt_ids: list[int]) -> str:
        """The prompt as ``echo`` returns it: the text sent, or the text of the token ids sent."""
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], (str, list)) \
            else body.prompt
        if isinstance(prompt, str):
            return prompt
        return b"".join(self.engine.token_bytes[t] for t in prompt_ids).decode("utf-8", errors="replace")

    async def _encode_prompt(self, body: p.CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list):
            if not prompt:
                raise APIError(400, "prompt is empty: send a string or a list of token ids", param="prompt",
                               code="invalid_value")
            if isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise APIError(400, f"prompt holds {len(prompt)} prompts: batches are not supported, "
                                        "send one prompt per request",
                                   param="prompt", code="unsupported")
                prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt is empty: send some text", param="prompt", code="invalid_value")
            ids = await self._tokenize(lambda: self.engine.encode(prompt), "prompt")
        else:
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(400, f"prompt holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})",
                               param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "prompt is empty after tokenization: send some text", param="prompt",
                           code="invalid_value")
        return ids

    async def _encode_chat(self, body: p.ChatCompletionRequest) -> list[int]:
        if not body.messages:
            raise APIError(400, "messages is empty: send at least one message", param="messages", code="invalid_value")
        for i, m in enumerate(body.messages):
            kinds = {part.type for part in m.content} - {"text"} if isinstance(m.content, list) else set()
            if kinds:
                raise APIError(400, f"messages[{i}] holds {', '.join(sorted(kinds))} content: "
                                    "ChatLoop reads text parts only",
                               param=f"messages.{i}.content", code="unsupported")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await self._tokenize(lambda: self.engine.encode(messages, chat=True), "messages")

    async def _tokenize(self, encode: Callable[[], list[int]], param: str) -> list[int]:
        try:
            return await asyncio.to_thread(encode)
        except ContextLengthError as e:  # too long to fit whatever its tokens: refused before tokenizing
            raise APIError(413, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        except Exception as e:  # e.g. the chat template refuses a role order
            raise APIError(400, f"{param} could not be turned into tokens: {type(e).__name__}: {e}", param=param,
                           code="invalid_value") from None

    def _params(self, body: Body, num_prompt: int, chat: bool) -> SamplingParams:
        prompt_param = "messages" if chat else "prompt"
        room = self.context_tokens - num_prompt
        score_only = body.max_tokens == 0  # completions only: chat's schema says max_tokens >= 1
        if score_only and not (body.echo and body.logprobs is not None):  # type: ignore[union-attr]
            raise APIError(400, "max_tokens=0 generates nothing: it only scores the prompt, so send echo=true and "
                                "logprobs (0 to 5) with it, or ask for at least 1 token", param="max_tokens",
                           code="invalid_value")
        if room < (0 if score_only else 1):
            raise APIError(413, f"the prompt has {num_prompt} tokens, the context holds {self.context_tokens} tokens "
                                f"for the prompt and the completion together: shorten the {prompt_param}",
                           param=prompt_param, code="context_length_exceeded")
        # Chat's max_tokens wins over max_completion_tokens (its newer name); either one sent must fit.
        limits = {"max_tokens": body.max_tokens}
        if chat:
            limits["max_completion_tokens"] = body.max_completion_tokens  # type: ignore[union-attr]
        for name, value in limits.items():
            if value is not None and value > room:
                raise APIError(400, f"{name}={value} is too large: the prompt has {num_prompt} tokens "
                                    f"and the context holds {self.context_tokens}, so at most {room} tokens "
                                    f"can be generated: lower {name} or shorten the {prompt_param}",
                               param=name, code="context_length_exceeded")
        max_tokens = next((value for value in limits.values() if value is not None), None)
        if max_tokens is None:
            default = self.cfg.server.default_max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
            max_tokens = min(default, room)
        defaults = self.cfg.sampling
        temperature = defaults.temperature if body.temperature is None else body.temperature
        top_p = defaults.top_p if body.top_p is None else body.top_p
        top_k = defaults.top_k if body.top_k is None else body.top_k
        penalty = defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])  # the schema bounds them
        if chat:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None  # type: ignore[union-attr]
            prompt_logprobs = False
        else:
            logprobs = body.logprobs  # type: ignore[union-attr]
            prompt_logprobs = body.echo and logprobs is not None  # type: ignore[union-attr]
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=penalty, seed=body.seed, stop=tuple(stop),
                                  ignore_eos=body.ignore_eos, timeout_s=self.cfg.server.request_timeout_s,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  speculative_method=body.speculative_method,
                                  speculative_tokens=body.speculative_tokens)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> EventStream:
        try:
            return EventStream(self.engine.submit, prompt_ids, params,
                               on_first_token=self.metrics.time_to_first_token.observe,
                               on_inter_token=self.metrics.inter_token_latency.observe)
        except QueueFullError as e:
            raise APIError(429, f"{e}", code="queue_full", headers={"Retry-After": "1"}) from None
        except ContextLengthError as e:  # checked above already; the engine's own checks as a backstop
            raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from None
        except RequestError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        except SchedulerClosedError as e:
            raise APIError(503, f"{e}: the server is stopping", code="shutting_down") from None
        except ClusterUnavailableError as e:
            self.health.note_failure()
            raise APIError(503, str(e), code="stage_unavailable", headers={"Retry-After": "5"}) from None

    # ---- answers -----------------------------------------------------------------------------
    def _failure(self, event: SequenceEvent) -> APIError:
        """The error a request that ended with ``error`` (or ``cancelled`` by a shutdown) gets."""
        if event.finish_reason is FinishReason.CANCELLED:
            return APIError(503, "the request was cancelled because the server is stopping: retry later",
                            code="shutting_down")
        error = event.error
        if isinstance(error, DeadlineExceededError):
            return APIError(504, str(error), code="timeout")
        if isinstance(error, ClusterUnavailableError):
            self.health.note_failure()
            return APIError(503, str(error), code="stage_unavailable", headers={"Retry-After": "5"})
        text = first_line(error, limit=400) if error is not None else "unknown error"
        log.warning("a request failed in the pipeline: %s", text)
        self.health.note_failure()
        if isinstance(error, StageError):
            where = self.stage_names[error.stage] if error.stage is not None else "a stage"
            how = "" if error.kind is FaultKind.FAILED else f" ({error.kind.value})"
            return APIError(503, f"the pipeline failed at {where}{how}: {text}: "
                                 "retry; if it persists see GET /health or chatloop-status", code="stage_unavailable")
        return APIError(500, f"the request failed: {text}", code="internal_error")

    def _finish(self, endpoint: str, stream: EventStream, started: float, outcome: str) -> None:
        self.metrics.outcome(endpoint, outcome)
        self.metrics.completion_tokens.inc(stream.num_tokens)
        if outcome in ("stop", "length"):
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - started)

    async def _collect(self, endpoint: str, body: Body, request: Request, stream: EventStream, id_: str,
                       prompt_ids: list[int], echo: str | None) -> Response:
        pieces: list[str] = []
        scores: list[ScoredToken] = []
        prompt_scores: tuple[ScoredToken, ...] = ()
        try:
            while True:
                event = await stream.next(request.is_disconnected)
                if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    raise self._failure(event)
                pieces.append(event.text)
                scores.extend(event.logprobs)
                prompt_scores = event.prompt_logprobs or prompt_scores
                if event.finish_reason is not None:
                    break
        except ClientDisconnected:
            self._finish(endpoint, stream, stream.submitted, "disconnected")
            return Response(status_code=499)
        finally:
            stream.close()
        self._finish(endpoint, stream, stream.submitted, event.finish_reason.value)
        use = p.usage(len(prompt_ids), stream.num_tokens, event.cached_tokens, event.drafted_tokens,
                      event.accepted_tokens)
        text = "".join(pieces)
        if isinstance(body, p.ChatCompletionRequest):
            logprobs = chat_logprobs(self.engine.token_bytes, scores) if body.logprobs else None
            return _json(p.chat_response(id_, self.model_name, text, event.finish_reason.value, use, logprobs))
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(self.engine.token_bytes, [*prompt_scores, *scores] if echo is not None
                                           else scores, first_token=prompt_ids[0] if echo is not None else None)
        text = text if echo is None else echo + text
        return _json(p.completion_response(id_, self.model_name, text, event.finish_reason.value, use, logprobs))

    async def _stream(self, endpoint: str, body: Body, request: Request, stream: EventStream, id_: str,
                      num_prompt: int, chat: bool) -> Response:
        try:
            first = await stream.next(request.is_disconnected)
        except ClientDisconnected:
            stream.close()
            self._finish(endpoint, stream, stream.submitted, "disconnected")
            return Response(status_code=499)
        if first.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            stream.close()
            raise self._failure(first)
        created = int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        object_ = "chat.completion.chunk" if chat else "text_completion"

        wants_logprobs = bool(body.logprobs) if chat else body.logprobs is not None  # type: ignore[union-attr]
        offset = 0  # characters streamed so far (completions' text_offset)

        def piece(text: str, finish: str | None, scored: tuple[ScoredToken, ...] = ()) -> dict:
            nonlocal offset
            logprobs = None
            if chat:
                if wants_logprobs and scored:
                    logprobs = chat_logprobs(self.engine.token_bytes, scored)
                return p.chat_chunk(id_, self.model_name, created, {"content": text} if text else {}, finish,
                                    logprobs)
            if wants_logprobs and scored:
                logprobs = completion_logprobs(self.engine.token_bytes, scored, offset=offset)
                offset += sum(len(t) for t in logprobs["tokens"])
            return p.completion_chunk(id_, self.model_name, created, text, finish, logprobs)

        async def events() -> AsyncIterator[str]:
            outcome = "disconnected"
            try:
                if chat:
                    yield sse(p.chat_chunk(id_, self.model_name, created, {"role": "assistant", "content": ""}, None))
                event = first
                while True:
                    if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                        failure = self._failure(event)
                        outcome = "unavailable" if failure.status == 503 else "error"
                        yield sse(failure.body())
                        yield SSE_DONE
                        return
                    if event.text or (wants_logprobs and event.logprobs):
                        yield sse(piece(event.text, None, event.logprobs))
                    if event.finish_reason is not None:
                        outcome = event.finish_reason.value
                        yield sse(piece("", event.finish_reason))
                        if include_usage:
                            yield sse(p.usage_chunk(id_, object_, self.model_name, created,
                                                    p.usage(num_prompt, stream.num_tokens,
                                                            event.cached_tokens, event.drafted_tokens,
                                                            event.accepted_tokens)))
                        yield SSE_DONE
                        return
                    event = await stream.next()
            finally:
                stream.close()
                self._finish(endpoint, stream, stream.submitted, outcome)

        return SSEResponse(events(), on_close=stream.close)


def _json(data: dict) -> Response:
    return Response(json.dumps(data, ensure_ascii=False), media_type="application/json")
