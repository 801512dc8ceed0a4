"""``chatloop-serve``: the OpenAI-compatible HTTP API in front of a running :class:`~chatloop.ChatLoop`.

    chatloop-serve                                    # embedded SmolLM2 over 4 workers, http://127.0.0.1:8000/v1
    chatloop-serve server.port=8080 server.api_key=secret cluster.num_workers=2
    torchrun --nproc-per-node 5 --no-python chatloop-serve    # rank 0 serves, ranks 1..4 are workers

Routes: POST /v1/completions, POST /v1/chat/completions (``stream: true`` for Server-Sent
Events), GET /v1/models, GET /v1/status (what ``chatloop-status`` prints), GET /health
(200 when every stage answers, else 503 naming the stages down), GET /metrics (Prometheus),
GET /openapi.json and /docs. With ``server.api_key`` set, /v1/* needs ``Authorization:
Bearer <key>``; /health and /metrics stay open for probes and scrapers.

The RPC ports of the cluster (``cluster.master_port`` and TensorPipe's) execute pickled data:
keep them on a private network. Only this HTTP port is meant for clients.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import __version__
from ..config import ChatLoopConfig
from ..engine import EngineClient
from . import protocol as p
from .completions import ENDPOINTS, CompletionService
from .errors import APIError, install_error_handlers
from .health import HealthMonitor
from .metrics import CONTENT_TYPE, ServerMetrics
from .status import build_status

__all__ = ["create_app", "model_id", "main", "serve"]

log = logging.getLogger(__name__)

_OUTCOMES = {401: "unauthorized", 429: "queue_full", 503: "unavailable"}


def model_id(cfg: ChatLoopConfig) -> str:
    """The model id the API reports: server.model_name, else the model's name (a folder's last part)."""
    return cfg.server.model_name or Path(cfg.model.name).name


def create_app(engine: EngineClient, cfg: ChatLoopConfig, *, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (a started :class:`~chatloop.ChatLoop`): the caller starts and stops it.

    ``on_shutdown`` runs (in a thread) when the server stops, after the last connection: the
    place to shut the engine down, since uvicorn re-raises SIGTERM right after and the process ends.
    """
    name = model_id(cfg)
    started = time.time()
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

    def count(request: Request, error: APIError) -> None:
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint is not None:
            metrics.outcome(endpoint, _OUTCOMES.get(error.status, "invalid" if error.status < 500 else "error"))

    install_error_handlers(app, on_error=count)

    bearer = HTTPBearer(auto_error=False, description="server.api_key, when the server sets one.")

    # FastAPI's idiom; Annotated would not do here: with postponed annotations it cannot see the local ``bearer``.
    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        key = cfg.server.api_key
        if not key:
            return
        if credentials is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (the server sets server.api_key)",
                           code="invalid_api_key")
        if not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
            raise APIError(401, "invalid API key: send the server's server.api_key as 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])
    errors = {
        400: {"description": "Invalid request (OpenAI error body)"}, 401: {"description": "Missing or wrong API key"},
        404: {"description": "Unknown model"}, 413: {"description": "Prompt longer than the context"},
        429: {"description": "Queue full: retry after Retry-After seconds"}, 503: {"description": "A stage is down"},
    }

    @v1.post("/completions", response_model=p.CompletionResponse, responses=errors,
             summary="Complete a prompt (stream: true for Server-Sent Events)")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await service.handle("completions", body, request)

    @v1.post("/chat/completions", response_model=p.ChatCompletionResponse, responses=errors,
             summary="Answer a conversation (stream: true for Server-Sent Events)")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await service.handle("chat_completions", body, request)

    @v1.get("/models", response_model=p.ModelList, summary="The model this server runs")
    async def models() -> dict:
        return {"object": "list", "data": [_card(name, started)]}

    @v1.get("/models/{model}", response_model=p.ModelCard, responses={404: errors[404]}, summary="One model")
    async def model(model: str) -> dict:
        if model != name:
            raise APIError(404, f"model {model!r} does not exist here: use {name!r}", param="model",
                           code="model_not_found")
        return _card(name, started)

    @v1.get("/status", summary="The coordinator and every stage (what chatloop-status prints)")
    async def status() -> dict:
        report = await health.check(max_age=1.0)
        return build_status(engine.stats(), report, model=name)

    app.include_router(v1)

    @app.get("/health", summary="200 when every stage answers, else 503 naming the stages down")
    async def health_route() -> JSONResponse:
        report = await health.check(max_age=1.0)
        return JSONResponse(report.as_json(), status_code=200 if report.healthy else 503)

    @app.get("/metrics", summary="Prometheus metrics of the coordinator (chatloop_*)")
    async def metrics_route() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def _card(name: str, created: float) -> dict:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "chatloop"}


# ---- chatloop-serve --------------------------------------------------------------------------
def serve(cfg: ChatLoopConfig) -> None:
    """Start the cluster, serve HTTP until SIGINT/SIGTERM, then shut the cluster down."""
    import uvicorn

    from ..api import ChatLoop

    llm = ChatLoop.start(cfg)
    try:
        app = create_app(llm, cfg, on_shutdown=llm.shutdown)
        config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_config=None,
                                log_level=cfg.log_level.lower(), timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        log.info("serving %s on http://%s:%d/v1 (docs: /docs, health: /health, metrics: /metrics)",
                 model_id(cfg), cfg.server.host, cfg.server.port)
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        if not server.started:
            raise RuntimeError(
                f"could not serve on {cfg.server.host}:{cfg.server.port}: is the port taken? set server.port")
    finally:
        llm.shutdown()


def _hydra_app():
    from ..cli import hydra_app

    return hydra_app(serve, program="chatloop-serve")


def main() -> None:
    """The ``chatloop-serve`` entry point (Hydra over conf/, overrides on the command line)."""
    _hydra_app()()


if __name__ == "__main__":
    main()
