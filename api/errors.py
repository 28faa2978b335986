"""JSON errors everywhere, never HTML: the 401/403 bodies of CONTRACT §2, 500 with a request id."""

from __future__ import annotations

import logging
from typing import Any, Final

from sanic import HTTPResponse, Request
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import json

from api.access import Denied
from api.tokens import TokenError
from sessiond.errors import DependencyUnavailable
from storage.redis_conn import REDIS_CONNECTION_ERRORS

log = logging.getLogger("api.errors")

WWW_AUTHENTICATE: Final = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
_UNAVAILABLE: Final = (*REDIS_CONNECTION_ERRORS, DependencyUnavailable, OSError)


def invalid_token(reason: str) -> HTTPResponse:
    return json({"error": "invalid_token", "reason": reason}, status=401, headers=WWW_AUTHENTICATE)


def forbidden(reason: str) -> HTTPResponse:
    return json({"error": "forbidden", "reason": reason}, status=403)


def _slug(exc: SanicException) -> str:
    name = type(exc).__name__
    known = {
        "NotFound": "not_found",
        "MethodNotAllowed": "method_not_allowed",
        "BadRequest": "bad_request",
        "PayloadTooLarge": "payload_too_large",
        "RequestTimeout": "request_timeout",
        "HeaderNotFound": "bad_request",
        "InvalidHeader": "bad_request",
        "RangeNotSatisfiable": "range_not_satisfiable",
    }
    return known.get(name, "http_error")


class JsonErrorHandler(ErrorHandler):
    """Maps every exception that escapes a view (or routing) to a JSON answer."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        if isinstance(exception, TokenError):
            return invalid_token(exception.reason)
        if isinstance(exception, Denied):
            return forbidden(exception.reason)
        if isinstance(exception, SanicException) and exception.status_code < 500:
            body: dict[str, Any] = {"error": _slug(exception)}
            if exception.status_code == 400:
                body["detail"] = str(exception)[:300]
            headers = dict(getattr(exception, "headers", None) or {})
            return json(body, status=exception.status_code, headers=headers)
        request_id = str(request.id) if request is not None else None
        metrics = getattr(getattr(request, "app", None), "ctx", None)
        if metrics is not None and hasattr(metrics, "metrics"):
            status = 503 if isinstance(exception, _UNAVAILABLE) else 500
            metrics.metrics.errors.inc(str(status))
        if isinstance(exception, _UNAVAILABLE):
            log.warning(
                "dependency unavailable",
                extra={
                    "request_id": request_id,
                    "path": getattr(request, "path", None),
                    "error": f"{type(exception).__name__}: {str(exception)[:300]}",
                },
            )
            return json({"error": "unavailable", "request_id": request_id}, status=503)
        log.error(
            "unhandled error",
            exc_info=exception,
            extra={"request_id": request_id, "path": getattr(request, "path", None)},
        )
        return json({"error": "internal", "request_id": request_id}, status=500)
