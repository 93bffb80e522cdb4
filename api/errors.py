"""Every error is JSON: {"error": {"code", "message", "fields"?}}. No input reaches the 500 handler.

A database that cannot be reached or is busy (common.db.is_unavailable) is a 503 with Retry-After, on
every path: SQLAlchemy's and the queue's raw psycopg connections (docs/database_outages.md).
"""
from __future__ import annotations

import logging
import sqlite3
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.responses import JSONResponse
from common.json_checks import MAX_DEPTH
from common.db import is_unavailable
from scheduler.grids import Conflict, NotFound

log = logging.getLogger("gridfleet.api")

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "too_many_requests", 503: "unavailable",
}
RETRY_AFTER_SECONDS = 2  # a Postgres restart takes about a second; workers back off on their own too


class ApiError(Exception):
    """An error reply a route raises on purpose."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers, self.extra = fields, headers, extra


def error_response(status: int, code: str, message: str, fields: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if fields:
        error["fields"] = fields
    body: dict[str, Any] = {"error": error}
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def database_unavailable(message: str = "the database is unavailable or busy; retry in a few seconds",
                         extra: dict[str, Any] | None = None) -> JSONResponse:
    return error_response(503, "database_unavailable", message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                          extra=extra)


def field_path(loc: tuple | list) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or "body"


def _clean(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


_NON_FINITE = (b"NaN", b"Infinity", b"-Infinity")


def _json_problem(err: dict[str, Any], doc: Any) -> str:
    detail = (err.get("ctx") or {}).get("error", "")
    pos = err["loc"][-1] if err.get("loc") else "?"
    message = f"malformed JSON at character {pos}: {detail}"
    if isinstance(doc, str):
        doc = doc.encode()
    if isinstance(doc, bytes) and isinstance(pos, int) and doc[pos:pos + 9].startswith(_NON_FINITE):
        message += " (NaN and Infinity are not JSON; send null or a string instead)"
    elif "depth limit" in str(detail):  # orjson stops parsing at 1024 levels, before our depth check can look
        message += f" (a body may nest at most {MAX_DEPTH} levels of objects and arrays)"
    elif "infinity" in str(detail):
        message += " (a number too large for a double; send it as a string)"
    return message


def validation_fields(errors: list[dict[str, Any]], body: Any = None) -> list[dict[str, str]]:
    fields = []
    for err in errors:
        kind = err.get("type")
        if kind == "json_invalid":
            fields.append({"field": "body", "message": _json_problem(err, body)})
        elif kind == "missing" and tuple(err.get("loc", ())) == ("body",):
            fields.append({"field": "body", "message": "a JSON body is required (Content-Type: application/json)"})
        elif kind in ("model_attributes_type", "dict_type", "model_type") and tuple(err.get("loc", ())) == ("body",):
            fields.append({"field": "body", "message": "the body must be a JSON object (Content-Type: application/json)"})
        else:
            fields.append({"field": field_path(err.get("loc", ())), "message": _clean(str(err.get("msg", "invalid")))})
    return fields


def summary(fields: list[dict[str, str]], limit: int = 5) -> str:
    shown = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:limit])
    more = f" (and {len(fields) - limit} more)" if len(fields) > limit else ""
    return f"invalid request: {shown}{more}"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers, exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path[:200]} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:200]} (see /docs)"
        else:
            message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        fields = validation_fields(list(exc.errors()), exc.body)
        return error_response(422, "invalid_request", summary(fields), fields)

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound):
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict):
        return error_response(409, "conflict", str(exc))

    # Database errors from both paths: SQLAlchemy's, and psycopg's and sqlite3's own from the queue's raw
    # connections (the hot path). A more specific handler registered for one of their subclasses still wins.
    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(psycopg.Error)
    @app.exception_handler(sqlite3.Error)
    async def _db_error(request: Request, exc: Exception):
        if not is_unavailable(exc):
            return _unexpected_error(request, exc)
        driver_error = getattr(exc, "orig", None) or exc  # only its type: a message may name the host
        log.error("database unavailable on %s %s: %s", request.method, request.url.path, type(driver_error).__name__)
        return database_unavailable()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return _unexpected_error(request, exc)


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error",
                          "unexpected server error; it was logged on the server. Please report it.")
