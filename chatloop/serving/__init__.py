"""Serving: the OpenAI-compatible HTTP API, Prometheus metrics, health and status.

- ``app``: ``create_app(engine, cfg)`` (FastAPI) and the ``chatloop-serve`` command.
- ``completions``: /v1/completions and /v1/chat/completions (JSON or Server-Sent Events).
- ``bridge``: the engine thread's events onto the event loop (``call_soon_threadsafe``).
- ``errors``: OpenAI-style error bodies; ``protocol``: the wire format.
- ``health``: every stage's report with a timeout; ``status``: GET /v1/status and ``chatloop-status``.
- ``metrics``: the coordinator's ``chatloop_*`` metrics (each worker's are ``chatloop.runtime.worker_metrics``).

This package talks to the engine through :class:`chatloop.engine.EngineClient` only: it holds no
scheduling logic and imports no ``torch.distributed.rpc``. The cluster's RPC ports execute
pickled data: they must listen only on a private network; the HTTP port is the one meant for
clients (loopback by default, ``server.host`` to expose it).
"""

from .app import create_app

__all__ = ["create_app"]
