"""The FastAPI app. Run with `gridfleet serve` or `uvicorn --factory api.app:create_app`."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import dashboard, docs, errors, metrics, tokens
from api.responses import JSONResponse
from api.routes import grids, health, jobs, workers
from common.db import is_sqlite, make_engine, migrate
from common.settings import Settings
from scheduler.policy import RetryPolicy
from scheduler.search import SearchLoop, Searches
from worker import trainers

log = logging.getLogger("gridfleet.api")
API_PREFIX = "/api/v1"
TOKEN_CACHE_SECONDS = 5.0
# The sync routes run in AnyIO's thread pool (40 threads), each holding a connection for one short
# transaction. Keep every connection the pool opens (at most 30, as with make_engine's default 10 + 20
# overflow) instead of closing those above 10 on return: with 16 busy workers that default opened about
# 40 new Postgres connections a second (bench/queue_throughput.py, --workers 16).
POSTGRES_POOL = {"pool_size": 30, "max_overflow": 0}


def bootstrap_admin(engine, settings: Settings) -> str:
    """Make sure the configured admin token (GRIDFLEET_ADMIN_TOKEN) is stored, hashed.

    Returns 'created', 'present', 'revoked', 'exists' (no token configured, another admin token is
    stored) or 'missing' (no admin token at all: `gridfleet serve` then makes one and prints it).
    """
    configured = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if configured:
        outcome = tokens.ensure_token(engine, configured, "admin", "admin (GRIDFLEET_ADMIN_TOKEN)")
        if outcome == "revoked":
            log.warning("the configured admin token (GRIDFLEET_ADMIN_TOKEN) was revoked; it stays revoked")
        if len(configured) < 16:
            log.warning("the configured admin token is short (%d characters); use `gf_...` from "
                        "`gridfleet token create --role admin` or at least 32 random characters", len(configured))
        return outcome
    return "exists" if tokens.has_active(engine, "admin") else "missing"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    migrate(settings.database_url)
    engine = make_engine(settings.database_url, **({} if is_sqlite(settings.database_url) else POSTGRES_POOL))
    if bootstrap_admin(engine, settings) == "missing":
        log.warning("no admin token exists: set GRIDFLEET_ADMIN_TOKEN, or run `gridfleet token create --role admin`")

    searches = Searches(engine, external_id=trainers.external_id, fuse_key=trainers.fuse_key)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Searches go on after a restart: the loop's first round adopts trials asked but not stored and tells
        # results not yet told (scheduler/search.py).
        loop = SearchLoop(searches, settings.search_interval).start() if settings.search_interval > 0 else None
        yield
        if loop is not None:
            loop.stop()
        searches.close()
        engine.dispose()

    app = FastAPI(
        title="gridfleet",
        summary="Grids of training configs on a fleet of GPU workers",
        default_response_class=JSONResponse,
        lifespan=lifespan,
        docs_url=None,  # api/docs.py serves /docs and /redoc with local assets (no CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    grace = settings.lease_seconds if settings.expiry_grace_after_start is None else settings.expiry_grace_after_start
    app.state.metrics = metrics.install(app, engine, public=settings.metrics_public,
                                       api_prefix=API_PREFIX)
    app.state.queue = metrics.CountedQueue(engine, RetryPolicy.from_settings(settings), expiry_grace_seconds=grace,
                                           metrics=app.state.metrics)
    app.state.searches = searches
    app.state.token_cache = tokens.TokenCache(ttl=TOKEN_CACHE_SECONDS)
    app.state.worker_secrets = {}  # worker id -> secret hash (api/worker_secrets.py)
    errors.install(app)
    docs.install(app)
    app.include_router(health.router)
    for module in (grids, jobs, workers):
        app.include_router(module.router, prefix=API_PREFIX)
    dashboard.install(app, API_PREFIX)  # `/` and its read endpoints
    return app
