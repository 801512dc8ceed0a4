"""OpenAI-style errors: every failure of the HTTP API is a JSON body, never a stack trace.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "..."}}

Routes raise :class:`APIError`; :func:`install_error_handlers` turns it, FastAPI's validation
errors (malformed JSON, wrong types), unknown routes and anything unexpected into that body.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "error_body", "install_error_handlers"]

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """A request that cannot be served: the HTTP status and a message that says what to change."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|constrained-\w+|[A-Z_].*|.*[\[(].*)$")


def _param(loc: tuple) -> str | None:
    """``body.messages.0.content.str`` -> ``messages.0.content`` (drop the body and pydantic's union tags)."""
    parts = [str(part) for part in loc if part != "body" and not (isinstance(part, str) and _TYPE_TAG.match(part))]
    return ".".join(parts) or None


def _branch(loc: tuple) -> tuple:
    """``loc`` up to its first union tag: the errors of one branch of a union share it (others: their whole loc)."""
    for i, part in enumerate(loc):
        if part != "body" and isinstance(part, str) and _TYPE_TAG.match(part):
            return tuple(loc[: i + 1])
    return tuple(loc)


def _depth(error: dict) -> int:
    return len((_param(error.get("loc", ())) or "").split("."))


def _validation_error(exc: RequestValidationError) -> APIError:
    """The problem pydantic found that says most, as ``param: what is wrong (got ...)``.

    A union (``prompt``: text, token ids or a list of one of them) reports a problem per branch: the
    branch with the fewest problems, then the deepest one (``prompt.1``, not ``prompt``), is the one
    the client meant, and its problem is the one to fix.
    """
    errors = exc.errors()
    if not errors:
        return APIError(400, "the request body is invalid", code="invalid_request")
    per_branch = Counter(_branch(e.get("loc", ())) for e in errors)
    fewest = min(per_branch.values())
    errors = sorted(errors, key=lambda e: (per_branch[_branch(e.get("loc", ()))] > fewest, -_depth(e)))  # stable
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({reason}): send a JSON object", code="invalid_json")
    if isinstance(first.get("input"), (bytes, bytearray)):  # a body without a JSON Content-Type stays bytes
        return APIError(400, "the request body was not read as JSON: send a JSON object with "
                             "'Content-Type: application/json'", code="invalid_json")
    param = _param(first.get("loc", ()))
    # The same spot in the other branches with as few problems: "a string | a list" where no branch got further.
    same = [e for e in errors if _param(e.get("loc", ())) == param
            and per_branch[_branch(e.get("loc", ()))] == fewest]
    others = len(errors) - len(same)
    if first.get("type") == "missing":
        text = f"{param} is required" if param else "the request body is missing: send a JSON object"
    elif not param:
        text = f"the request body must be a JSON object with the endpoint's fields ({first.get('msg', 'invalid')})"
    else:
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        expected = list(dict.fromkeys(e.get("msg", "invalid value") for e in same))
        text = f"{param}: {' | '.join(expected)} (got {shown[:80]})"
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return APIError(400, text + more, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, on_error: Callable[[Request, APIError], None] | None = None) -> None:
    """Map APIError, validation errors, HTTP errors and unexpected exceptions to OpenAI error bodies.

    ``on_error(request, error)`` sees every error answer (the metrics count them).
    """

    def answer(request: Request, error: APIError) -> JSONResponse:
        if on_error is not None:
            try:
                on_error(request, error)
            except Exception:  # pragma: no cover - counting must not turn an answer into a 500
                log.exception("on_error failed")
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /openapi.json for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}: see /openapi.json for the API"
        elif exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8, nested too deeply)
            return answer(request, APIError(400, "the request body could not be decoded (not UTF-8, or nested too "
                                                 "deeply): send a JSON object in UTF-8", code="invalid_json"))
        else:
            message = str(exc.detail)
        return answer(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))
