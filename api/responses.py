"""Fast JSON in and out: orjson renders replies and parses request bodies.

FastAPI's own ORJSONResponse is deprecated in the installed FastAPI (0.16x), so this is the same
idea in a few lines. Parsing bodies with orjson also rejects NaN/Infinity literals and numbers that
overflow a double (json.loads accepts both), so no non-finite float ever reaches the database; its
JSONDecodeError subclasses json.JSONDecodeError, which FastAPI turns into a 422 `json_invalid` error.

Before any route runs, a body is held to the limits of common/json_checks.py: at most MAX_BODY_BYTES
(16 MiB; larger is a 413, checked while reading) and MAX_DEPTH (64) levels of objects/arrays counted from
the body's root (deeper is a 422 naming the field). orjson refuses lone surrogates (`"\\ud800"`) outright;
such a body is parsed again by the standard library so the models can name the field (or repair free text).
"""
from __future__ import annotations

import json
from typing import Any, Callable

import orjson
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _StarletteJSON
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from common.json_checks import MAX_BODY_BYTES, MAX_DEPTH, clean_text, too_deep


class JSONResponse(_StarletteJSON):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # e.g. an int beyond 64 bits or a lone surrogate stored by an older version: never 500
            return clean_text(json.dumps(content, default=str, ensure_ascii=False))[0].encode()


def _too_large() -> HTTPException:
    return HTTPException(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB; "
                              "send fewer items per request")


def _not_a_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class OrjsonRequest(Request):
    async def body(self) -> bytes:
        """The body, refused with a 413 as soon as it is known to exceed MAX_BODY_BYTES."""
        if not hasattr(self, "_body"):
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                raise _too_large()
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise _too_large()
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                if "surrogate" not in str(exc):
                    raise
                try:  # the standard library keeps lone surrogates; json_checks then names the field
                    self._json = json.loads(body, parse_constant=_not_a_constant)
                except (ValueError, RecursionError):
                    raise exc from None
        return self._json


def _check_depth(body: Any, raw: bytes) -> None:
    """422 naming the field when the parsed body nests deeper than MAX_DEPTH levels."""
    if raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH:  # cannot be that deep: skip the walk (most bodies)
        return
    problem = too_deep(body, "")
    if problem is not None:
        field = problem.field.split(".")[0]  # the body's field; the message says where inside it
        raise RequestValidationError([{"type": "too_deep", "loc": ("body", field),
                                       "msg": f"{problem.message} (at {problem.field})"}])


class FastRoute(APIRoute):
    """An APIRoute whose request bodies are parsed by orjson, within the size and depth limits."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route_handler(request: Request) -> Response:
            request = OrjsonRequest(request.scope, request.receive)
            if takes_body:
                raw = await request.body()
                try:
                    body = await request.json() if raw else None
                except (ValueError, RecursionError):
                    body = None  # FastAPI parses it again and answers 422 json_invalid
                _check_depth(body, raw)
            return await handler(request)

        return route_handler
