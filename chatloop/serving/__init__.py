"""Serving: the OpenAI-compatible HTTP API, Prometheus metrics, health and status.

- ``app``: ``create_app(llm, cfg)`` (FastAPI) and the ``chatloop-serve`` command.
- ``completions``: /v1/completions and /v1/chat/completions (JSON or Server-Sent Events).
- ``bridge``: the scheduler thread's events onto the event loop (``call_soon_threadsafe``).
- ``errors``: OpenAI-style error bodies; ``protocol``: the wire format.
- ``health``: every stage's ``describe()`` with a timeout; ``status``: GET /v1/status and ``chatloop-status``.
- ``metrics``: the coordinator's ``chatloop_*`` metrics; ``worker_metrics``: each worker's endpoint.

This package holds no scheduling logic and imports no ``torch.distributed.rpc``. The cluster's
RPC ports execute pickled data: they must listen only on a private network; the HTTP port is
the one meant for clients (loopback by default, ``server.host`` to expose it).
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Lazy: worker processes import worker_metrics only, without FastAPI.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
