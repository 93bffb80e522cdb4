"""The dashboard at `/`: a static page plus one small JavaScript module per view (static/), and the read
endpoints those modules need beyond the plain API (views.py), under /api/v1/dashboard/.

The page holds nothing secret: it asks for a token, keeps it in sessionStorage and sends it as the bearer
header of every read, so the same tokens and roles guard the data. Every asset ships in this package (the
vendored uPlot's licence beside it), and the page's Content-Security-Policy lets the browser fetch nothing
from any other host.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from api import auth
from api.deps import get_engine
from api.errors import ApiError
from api.models import INT32_MAX
from api.responses import JSONResponse
from api.routes.common import grid_ref, router as make_router
from api.dashboard import views

STATIC = Path(__file__).parent / "static"
MAX_CURVES = 50
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

page = APIRouter(include_in_schema=False)
data = make_router("dashboard")


@page.get("/")
def index():
    return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)


@data.get("/dashboard/grids", dependencies=[Depends(auth.any_role)],
          summary="Every grid's summary with the workers running its jobs now")
def grids(engine: Engine = Depends(get_engine)):
    return JSONResponse({"grids": views.grids_overview(engine)})


@data.get("/dashboard/grids/{grid}", dependencies=[Depends(auth.any_role)],
          summary="One grid for its page: swept keys, one row per job with labels, hyper-parameter importance")
def grid(grid: str, engine: Engine = Depends(get_engine)):
    return JSONResponse(views.grid_view(engine, grid_ref(grid)))


@data.get("/dashboard/curves", dependencies=[Depends(auth.any_role)],
          summary="One metric against step for a few jobs (comma-separated ids)")
def curves(jobs: Annotated[str, Query(min_length=1, max_length=1000, pattern=r"^[0-9]{1,10}(,[0-9]{1,10})*$",
                                      description="job ids, e.g. 3,5,8")],
           metric: Annotated[str, Query(min_length=1, max_length=200)] = "loss",
           engine: Engine = Depends(get_engine)):
    ids = [int(j) for j in jobs.split(",")]
    if any(not 1 <= i <= INT32_MAX for i in ids):
        raise ApiError(422, "invalid_request", "job ids are between 1 and 2^31-1",
                       [{"field": "jobs", "message": "an id out of range"}])
    if len(ids) > MAX_CURVES:
        raise ApiError(422, "invalid_request", f"at most {MAX_CURVES} jobs at once",
                       [{"field": "jobs", "message": f"{len(ids)} ids; at most {MAX_CURVES}"}])
    return JSONResponse(views.curves(engine, ids, metric))


def install(app: FastAPI, api_prefix: str) -> None:
    app.include_router(page)
    app.include_router(data, prefix=api_prefix)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
