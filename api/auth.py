"""Bearer-token auth with roles admin / submit / worker.

`require(*roles)` makes an async dependency (runs on the event loop, no thread hop): a cache hit costs
one sha256; a miss looks the hash up in the database in the thread pool. The token itself never
appears in a reply, a log line or an exception message.
"""
from __future__ import annotations

from typing import Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.tokens import TokenCache, TokenInfo, hash_token, lookup

ANY_ROLE = ("admin", "submit", "worker")
SUBMIT = ("admin", "submit")
WORKER = ("admin", "worker")

bearer = HTTPBearer(auto_error=False, description="a gridfleet token: `gridfleet token create --role ROLE`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
MAX_TOKEN_LENGTH = 512


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers=_CHALLENGE)


async def authenticate(request: Request, credentials: HTTPAuthorizationCredentials | None) -> TokenInfo:
    if credentials is None or not credentials.credentials:
        raise _unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' "
            "(an admin makes one with `gridfleet token create --role ROLE`)"
        )
    token = credentials.credentials
    if len(token) > MAX_TOKEN_LENGTH:
        raise _unauthorized("invalid or revoked token")
    token_hash = hash_token(token)
    cache: TokenCache = request.app.state.token_cache
    info = cache.get(token_hash)
    if info is None:
        info = await run_in_threadpool(lookup, request.app.state.engine, token_hash)
        if info is None:
            raise _unauthorized("invalid or revoked token; check the token you sent or ask an admin for a new one")
        cache.put(token_hash, info)
    return info


def require(*roles: str) -> Callable:
    allowed = frozenset(roles)
    needed = " or ".join(roles)

    async def dependency(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> TokenInfo:
        info = await authenticate(request, credentials)
        if info.role not in allowed:
            raise ApiError(
                403, "forbidden",
                f"this endpoint needs a token with role {needed}; token '{info.name}' has role '{info.role}'",
            )
        return info

    dependency.__name__ = f"require_{'_or_'.join(roles)}"
    return dependency


any_role = require(*ANY_ROLE)
submitter = require(*SUBMIT)
worker = require(*WORKER)
