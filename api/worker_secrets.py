"""Worker secrets: every call under /workers/{worker_id}/ proves it comes from that worker's registration.

A worker token says "this caller may act as a worker", not which one, and many workers share a token.
`POST /workers/register` therefore returns a `worker_secret` (`gfw_` + 32 random bytes) once; only its
sha256 hex is stored (workers.secret_hash). The worker sends it as `X-Gridfleet-Worker-Secret` with every
call under its /workers/{worker_id}/ path, whatever its role (admin included), and the queue then also
checks that the job is held by that worker id. Hashes are cached per worker id in app.state.worker_secrets
(rows are never deleted, and a worker's hash never changes), so the hot path costs one sha256 and no
database round trip. The secret itself never appears in a reply other than register's, a log line or an
exception message.
"""
from __future__ import annotations

import hmac
import re
import secrets
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import Engine, select
from starlette.concurrency import run_in_threadpool

from api import auth
from api.errors import ApiError
from api.tokens import hash_token
from common import schema as t
from common.db import read_tx

HEADER = "X-Gridfleet-Worker-Secret"
PREFIX = "gfw_"
MAX_SECRET_LENGTH = 512
WORKER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
WorkerId = Annotated[str, Path(pattern=WORKER_ID_PATTERN, description="from POST /workers/register")]
_WORKER_ID = re.compile(WORKER_ID_PATTERN)
_NOT_REGISTERED = ""  # cached for a worker row without a hash (registered before migration 0004)


def new_secret() -> tuple[str, str]:
    """A new worker secret and the hash to store: (secret, sha256 hex)."""
    secret = PREFIX + secrets.token_urlsafe(32)
    return secret, hash_token(secret)


def unknown_worker(worker_id: str) -> ApiError:
    return ApiError(404, "unknown_worker", f"no worker {worker_id}; register again with POST /api/v1/workers/register")


def _forbidden(message: str) -> ApiError:
    return ApiError(403, "wrong_worker_secret", message)


def _stored_hash(engine: Engine, worker_id: str) -> str | None:
    """The worker's secret hash; None when there is no such worker."""
    with read_tx(engine) as conn:
        row = conn.execute(select(t.workers.c.secret_hash).where(t.workers.c.id == worker_id)).first()
    return None if row is None else (row.secret_hash or _NOT_REGISTERED)


async def check(
    request: Request,
    # The pattern is checked below, after the token (an anonymous caller learns nothing); shown in OpenAPI.
    worker_id: Annotated[str, Path(description="from POST /workers/register",
                                   json_schema_extra={"pattern": WORKER_ID_PATTERN})],
    credentials: HTTPAuthorizationCredentials | None = Depends(auth.bearer),
    secret: Annotated[str | None, Header(alias=HEADER, description="the worker_secret register returned")] = None,
) -> str:
    """The one dependency of every call under /workers/{worker_id}/: first the token (401, or 403 for a role
    other than admin or worker), then 404 for an unknown worker and 403 unless `secret` is the one its
    registration got. Returns the worker id. One dependency, not two: each costs ~35 us of CPU per request."""
    await auth.worker(request, credentials)
    if not _WORKER_ID.fullmatch(worker_id):
        raise ApiError(422, "invalid_request", "worker_id must be 1-32 letters, digits, '_' or '-', as POST "
                       "/api/v1/workers/register returned it", [{"field": "worker_id", "message": "not a worker id"}])
    cache: dict[str, str] = request.app.state.worker_secrets
    stored = cache.get(worker_id)
    if stored is None:
        stored = await run_in_threadpool(_stored_hash, request.app.state.engine, worker_id)
        if stored is None:
            raise unknown_worker(worker_id)
        cache[worker_id] = stored
    if not secret:
        raise _forbidden(f"missing {HEADER} header: send the worker_secret that POST /api/v1/workers/register "
                         f"returned for worker {worker_id} (every role needs it to act for a worker)")
    if stored == _NOT_REGISTERED:
        raise _forbidden(f"worker {worker_id} was registered before worker secrets existed; "
                         "register again with POST /api/v1/workers/register")
    if len(secret) > MAX_SECRET_LENGTH or not hmac.compare_digest(hash_token(secret), stored):
        raise _forbidden(f"wrong {HEADER} for worker {worker_id}: a worker may act only with the secret its own "
                         "registration returned (register again if this worker lost it)")
    return worker_id
