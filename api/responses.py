"""Fast JSON in and out: orjson renders replies and parses request bodies.

FastAPI's own ORJSONResponse is deprecated in the installed FastAPI (0.16x), so this is the same
idea in a few lines. Parsing bodies with orjson also rejects NaN/Infinity literals and numbers that
overflow a double (json.loads accepts both), so no non-finite float ever reaches the database; its
JSONDecodeError subclasses json.JSONDecodeError, which FastAPI turns into a 422 `json_invalid` error.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import orjson
from fastapi.responses import JSONResponse as _StarletteJSON
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class JSONResponse(_StarletteJSON):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # e.g. an int beyond 64 bits stored by an older client: fall back, never 500
            return json.dumps(content, default=str, ensure_ascii=False).encode()


class OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class FastRoute(APIRoute):
    """An APIRoute whose request bodies are parsed by orjson."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(OrjsonRequest(request.scope, request.receive))

        return route_handler
