"""``chatloop-serve``: the OpenAI-compatible HTTP API in front of a running :class:`~chatloop.ChatLoop`.

    chatloop-serve                                    # embedded SmolLM2 over 4 workers, http://127.0.0.1:8000/v1
    CHATLOOP_API_KEY=secret chatloop-serve server.port=8080 cluster.num_workers=2
    torchrun --nproc-per-node 5 --no-python chatloop-serve    # rank 0 serves, ranks 1..4 are workers

Routes: POST /v1/completions, POST /v1/chat/completions (``stream: true`` for Server-Sent
Events), GET /v1/models, GET /v1/status (what ``chatloop-status`` prints), GET /health
(200 when every stage answers, else 503 naming the stages down), GET /metrics (Prometheus),
GET /openapi.json and /docs. With a key ($CHATLOOP_API_KEY or ``server.api_key_file``), /v1/* needs
``Authorization: Bearer <key>``; /health and /metrics stay open for probes and scrapers.

The RPC ports of the cluster (``cluster.master_port`` and TensorPipe's) execute pickled data:
keep them on a private network. Only this HTTP port is meant for clients.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..config import ChatLoopConfig
from ..engine import EngineClient
from ..network import under_torchrun
from . import protocol as p
from .auth import load_api_key
from .completions import ENDPOINTS, CompletionService
from .errors import APIError, install_error_handlers
from .health import HealthMonitor
from .metrics import CONTENT_TYPE, ServerMetrics
from .status import build_status

__all__ = ["create_app", "model_id", "main", "serve"]

log = logging.getLogger(__name__)

_OUTCOMES = {401: "unauthorized", 429: "queue_full", 503: "unavailable", 504: "timeout"}


def model_id(cfg: ChatLoopConfig) -> str:
    """The model id the API reports: server.model_name, else the model's name (a folder's last part)."""
    return cfg.server.model_name or Path(cfg.model.name).name


def create_app(engine: EngineClient, cfg: ChatLoopConfig, *, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (a started :class:`~chatloop.ChatLoop`): the caller starts and stops it.

    ``on_shutdown`` runs (in a thread) when the server stops, after the last connection: the
    place to shut the engine down, since uvicorn re-raises SIGTERM right after and the process ends.
    The API key comes from ``server.api_key_file`` or ``$CHATLOOP_API_KEY`` (:func:`load_api_key`).
    """
    name = model_id(cfg)
    started = time.time()
    api_key = load_api_key(cfg.server)
    health = HealthMonitor(engine.describe_stages, engine.stage_names, timeout_s=cfg.server.health_timeout_s,
                           interval_s=cfg.server.health_interval_s)
    metrics = ServerMetrics(engine.stats, health)
    service = CompletionService(engine, cfg, name, metrics, health)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        health.start()
        try:
            yield
        finally:
            await health.stop()
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    app = FastAPI(
        title="ChatLoop",
        version=__version__,
        summary="OpenAI-compatible completions from a model split across pipeline-parallel workers.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.health, app.state.metrics = engine, health, metrics
    # A prompt of max_prompt_chars characters takes at most 6 bytes a character in JSON (\\uXXXX): a bigger body
    # cannot fit the context, and is refused before it is parsed (on the event loop health probes share).
    app.add_middleware(BodyLimit, max_bytes=int(cfg.server.max_request_mb * 2**20),
                       prompt_bytes=6 * engine.max_prompt_chars + 2**16)

    def count(request: Request, error: APIError) -> None:
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint is not None:
            metrics.outcome(endpoint, _OUTCOMES.get(error.status, "invalid" if error.status < 500 else "error"))

    install_error_handlers(app, on_error=count)

    # The schema declares Bearer auth only when the server checks a key.
    dependencies = [Depends(_bearer_check(api_key))] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=dependencies)
    error = {"model": p.ErrorResponse}
    errors: dict[int | str, dict] = {
        400: {**error, "description": "Invalid request: the message says what to change"},
        404: {**error, "description": "Unknown model"},
        413: {**error, "description": "Request body or prompt too long for the server or the context"},
        429: {**error, "description": "Queue full: retry after Retry-After seconds"},
        500: {**error, "description": "A sequence failed inside the pipeline"},
        503: {**error, "description": "A stage is down, or the server is stopping"},
        504: {**error, "description": "The request did not finish within server.request_timeout_s"},
    }
    if api_key:
        errors[401] = {**error, "description": "Missing or wrong API key"}

    def answers(model: type, chunk: type) -> dict[int | str, dict]:
        ok = {"description": "The answer (JSON), or with stream: true a stream of chunks (Server-Sent Events)",
              "content": {"application/json": {"schema": _ref(model)}, "text/event-stream": _event_stream(chunk)}}
        return {200: ok, **errors}

    @v1.post("/completions", response_model=p.CompletionResponse,
             responses=answers(p.CompletionResponse, p.CompletionChunk),
             summary="Complete a prompt (stream: true for Server-Sent Events)")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await service.handle("completions", body, request)

    @v1.post("/chat/completions", response_model=p.ChatCompletionResponse,
             responses=answers(p.ChatCompletionResponse, p.ChatCompletionChunk),
             summary="Answer a conversation (stream: true for Server-Sent Events)")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await service.handle("chat_completions", body, request)

    auth_errors = {401: errors[401]} if api_key else {}

    @v1.get("/models", response_model=p.ModelList, responses=auth_errors, summary="The model this server runs")
    async def models() -> dict:
        return {"object": "list", "data": [_card(name, started)]}

    @v1.get("/models/{model}", response_model=p.ModelCard, responses={404: errors[404], **auth_errors},
            summary="One model")
    async def model(model: str) -> dict:
        if model != name:
            raise APIError(404, f"model {model!r} does not exist here: use {name!r}", param="model",
                           code="model_not_found")
        return _card(name, started)

    @v1.get("/status", responses=auth_errors, summary="The coordinator and every stage (what chatloop-status prints)")
    async def status(request: Request) -> dict:
        report = await health.check(max_age=1.0)
        plan = getattr(engine, "plan_report", None)  # (an engine that does not plan has none)
        return build_status(engine.stats(), report, model=name, ports=_own_ports(cfg, request.url.port),
                            plan=plan() if plan is not None else None, speculative_method=cfg.speculative.method)

    app.include_router(v1)

    @app.get("/health", response_model=p.HealthResponse,
             responses={503: {"model": p.HealthResponse, "description": "A stage is down or makes no progress"}},
             summary="200 when every stage answers and makes progress, else 503 naming the stages down")
    async def health_route() -> JSONResponse:
        report = await health.check(max_age=1.0)
        return JSONResponse(report.as_json(), status_code=200 if report.healthy else 503)

    _state_limits_in_schema(app, name, engine)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics of the coordinator (chatloop_*)",
             responses={200: {"description": "Prometheus text format", "content": {CONTENT_TYPE.split(";")[0]: {
                 "schema": {"type": "string"}}}}})
    async def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


_STREAMED = (p.CompletionChunk, p.ChatCompletionChunk, p.ErrorResponse)
"""What the events of a stream carry: FastAPI lists only the JSON answers' models, the schema needs these too."""


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _event_stream(chunk: type) -> dict:
    """The ``text/event-stream`` content of a streamed answer: the schema of one event (Open API 3.1 reads a
    stream's ``schema`` so), whose data is a chunk, an error that ends the stream, or the last ``[DONE]``."""
    data = {"anyOf": [
        {"const": "[DONE]", "description": "The last event."},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [_ref(chunk), _ref(p.ErrorResponse)]},
         "description": f"A {chunk.__name__}, or an ErrorResponse for a failure after the first event (then [DONE])."},
    ]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data},
                       "description": "One Server-Sent Event: 'data: <JSON>' and a blank line."}}


def _state_limits_in_schema(app: FastAPI, name: str, engine: EngineClient) -> None:
    """Add what only the running engine knows to the schema: the model id, the vocabulary, the context; and the
    models the streams' events carry."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = schema["components"]["schemas"]
            _, streamed = models_json_schema([(model, "serialization") for model in _STREAMED],
                                             ref_template="#/components/schemas/{model}")
            for model_name, definition in streamed.get("$defs", {}).items():
                schemas.setdefault(model_name, definition)
            for request in ("CompletionRequest", "ChatCompletionRequest"):
                fields = schemas[request]["properties"]
                fields["model"]["enum"] = [name]
                for field in ("max_tokens", "max_completion_tokens"):
                    if field in fields:
                        for option in fields[field].get("anyOf", [fields[field]]):
                            if option.get("type") == "integer":
                                option["maximum"] = engine.context_length - 1
            for option in _walk(schemas["CompletionRequest"]["properties"]["prompt"]):
                if option.get("type") == "integer":
                    option["maximum"] = engine.vocab_size - 1
            methods = getattr(engine, "speculative_methods", None)  # (an engine without speculation has none)
            for request in ("CompletionRequest", "ChatCompletionRequest"):
                for option in _walk(schemas[request]["properties"]["speculative_method"]):
                    if "enum" in option:
                        option["enum"] = [*(methods if methods is not None else ()), "off"]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _walk(node):
    """Every dict inside a JSON-schema node."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _bearer_check(key: str) -> Callable:
    bearer = HTTPBearer(auto_error=False,
                        description="The server's API key ($CHATLOOP_API_KEY or server.api_key_file).")

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        # (FastAPI's idiom: Annotated would not do here, postponed annotations cannot see the local ``bearer``.)
        if credentials is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
            raise APIError(401, "invalid API key: send the server's key as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    return authorize


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` gets 413 without being read whole.

    A declared Content-Length over the limit is refused at once; a body without one (chunked)
    is read up to the limit, then refused, or handed on as it was. A completion request larger
    than ``prompt_bytes`` cannot hold a prompt that fits the context: 413 too, unparsed.
    """

    def __init__(self, app, max_bytes: int, prompt_bytes: int | None = None) -> None:
        self.app, self.max_bytes, self.prompt_bytes = app, max_bytes, prompt_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            size = int(declared)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if self.prompt_bytes and size > self.prompt_bytes and scope["path"] in ENDPOINTS:
                error = APIError(
                    413, f"the request has {size / 2**20:.1f} MiB: no prompt that fits the model's context is that "
                         f"long (at most {self.prompt_bytes / 2**20:.1f} MiB of JSON): shorten it",
                    code="context_length_exceeded")
                return await error.response()(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(413, f"the request body is larger than server.max_request_mb "
                              f"({self.max_bytes / 2**20:g} MiB): send less", code="request_too_large")
        await error.response()(scope, receive, send)


def _own_ports(cfg: ChatLoopConfig, http_port: int | None) -> dict[str, int]:
    """The coordinator's listening ports: HTTP (the one this request came to), and the store the workers join
    (torchrun's under torchrun)."""
    ports = {"http": http_port or cfg.server.port}
    if not cfg.cluster.in_process:
        ports["store"] = int(os.environ.get("MASTER_PORT", cfg.cluster.master_port)) if under_torchrun() \
            else cfg.cluster.master_port
    return ports


def _card(name: str, created: float) -> dict:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "chatloop"}


# ---- chatloop-serve --------------------------------------------------------------------------
def serve(cfg: ChatLoopConfig) -> None:
    """Start the cluster, serve HTTP until SIGINT/SIGTERM, then shut the cluster down."""
    import uvicorn

    from ..api import ChatLoop

    listener = bind_http_port(cfg.server.host, cfg.server.port)
    try:
        llm = ChatLoop.start(cfg)
    except BaseException:
        listener.close()
        raise
    try:
        app = create_app(llm, cfg, on_shutdown=llm.shutdown)
        config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_config=None,
                                log_level=cfg.log_level.lower(), timeout_graceful_shutdown=5)
        server = _server(config, stopping=llm.scheduler.close)
        log.info("serving %s on http://%s:%d/v1 (docs: /docs, health: /health, metrics: /metrics)",
                 model_id(cfg), cfg.server.host, cfg.server.port)
        if not ipaddress.ip_address(socket.gethostbyname(cfg.server.host)).is_loopback and not load_api_key(cfg.server):
            log.warning("server.host=%s without an API key: anyone who reaches this port can use the model (set "
                        "CHATLOOP_API_KEY or server.api_key_file; in a container, publish the port on 127.0.0.1)",
                        cfg.server.host)
        try:
            server.run(sockets=[listener])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        if not server.started:
            raise RuntimeError(
                f"could not serve on {cfg.server.host}:{cfg.server.port}: is the port taken? set server.port")
    finally:
        listener.close()
        llm.shutdown()


def bind_http_port(host: str, port: int) -> socket.socket:
    """The HTTP port, bound before the cluster starts (uvicorn listens on it once the app is up): a port that is
    taken is said at once, not after the model has loaded, and the cluster's own ephemeral ports (RPC, stage links)
    cannot take it while it loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as e:
        raise RuntimeError(f"server.host={host!r} cannot be served on: {e}: set server.host") from e
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (a restart within TIME_WAIT)
        listener.bind(address)
    except OSError as e:
        listener.close()
        raise RuntimeError(f"could not serve on {host}:{port}: {e.strerror}: set server.port, or stop what "
                           "listens there") from e
    return listener


def _server(config, stopping: Callable[[], None]):
    """A uvicorn server that, at the first SIGINT/SIGTERM, ends the running requests at once (``stopping``: their
    streams end with a 'server is stopping' error event): uvicorn's graceful shutdown waits for open connections,
    and with streams running it waited its whole ``timeout_graceful_shutdown`` (5 s) before the cluster stopped."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:  # in a thread: the signal may have come while this thread holds the scheduler
                threading.Thread(target=stopping, name="chatloop-stopping", daemon=True).start()
            super().handle_exit(sig, frame)

    return Server(config)


def _hydra_app():
    from ..cli import hydra_app

    return hydra_app(serve, program="chatloop-serve")


def main() -> None:
    """The ``chatloop-serve`` entry point (Hydra over conf/, overrides on the command line)."""
    _hydra_app()()


if __name__ == "__main__":
    main()
