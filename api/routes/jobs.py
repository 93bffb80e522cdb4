"""Jobs: detail, metrics, events, cancel, retry."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query
from sqlalchemy import Engine

from api import auth
from api.deps import get_engine
from api.models import INT32_MAX
from api.responses import JSONResponse
from api.routes.common import router as make_router
from scheduler import grids as g
from scheduler import reports

router = make_router("jobs")
JobId = Annotated[int, Path(ge=1, le=INT32_MAX, description="the job's id")]


@router.get("/jobs/{job_id}", dependencies=[Depends(auth.any_role)])
def get_job(job_id: JobId, engine: Engine = Depends(get_engine)):
    return JSONResponse(reports.job_detail(engine, job_id))


@router.get("/jobs/{job_id}/metrics", dependencies=[Depends(auth.any_role)])
def get_metrics(
    job_id: JobId,
    after_step: Annotated[int | None, Query(ge=-INT32_MAX - 1, le=INT32_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    engine: Engine = Depends(get_engine),
):
    return JSONResponse({"job_id": job_id, "metrics": reports.job_metrics(engine, job_id, after_step, limit)})


@router.get("/jobs/{job_id}/events", dependencies=[Depends(auth.any_role)])
def get_events(job_id: JobId, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
               engine: Engine = Depends(get_engine)):
    return JSONResponse({"job_id": job_id, "events": reports.job_events(engine, job_id, limit)})


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(auth.submitter)],
             summary="Cancel a queued job now, or ask its worker to stop a running one")
def cancel_job(job_id: JobId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"ok": True, "job_id": job_id, "state": g.cancel_job(engine, job_id)})


@router.post("/jobs/{job_id}/retry", dependencies=[Depends(auth.submitter)],
             summary="Queue a failed or cancelled job again with fresh budgets")
def retry_job(job_id: JobId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"ok": True, "job_id": job_id, "state": g.retry_job(engine, job_id)})
