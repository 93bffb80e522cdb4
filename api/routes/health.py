"""GET /healthz: open, no token. 200 when the database answers `SELECT 1`, else 503 with Retry-After."""
from __future__ import annotations

import logging

from fastapi import Depends
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import get_engine
from api.errors import database_unavailable
from api.responses import JSONResponse
from api.routes.common import router as make_router

router = make_router("health")
log = logging.getLogger("gridfleet.api")


@router.get("/healthz")
def healthz(engine: Engine = Depends(get_engine)):
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = type(getattr(exc, "orig", None) or exc).__name__
        log.warning("health check: database unavailable (%s)", reason)
        return database_unavailable(f"the database does not answer ({reason}); check that it is running and reachable",
                                    extra={"status": "error", "database": "unavailable"})
    return JSONResponse({"status": "ok", "database": "ok"})
