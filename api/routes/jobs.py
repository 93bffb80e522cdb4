"""Jobs: find (by external id, grid, state), detail, metrics, events, cancel, retry, resume."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Path, Query
from sqlalchemy import Engine

from api import auth
from api.deps import get_engine
from api.models import INT32_MAX
from api.responses import JSONResponse
from api.errors import ApiError
from api.routes.common import grid_ref, router as make_router
from scheduler import grids as g
from scheduler import reports
from scheduler.policy import JOB_STATES

router = make_router("jobs")
JobId = Annotated[int, Path(ge=1, le=INT32_MAX, description="the job's id")]


@router.get("/jobs", dependencies=[Depends(auth.any_role)],
            summary="Find jobs by external id (e.g. seed 001's config id), grid and/or state")
def list_jobs(
    external_id: Annotated[str | None, Query(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
                                             description="the id the trainer's users know a config by")] = None,
    seed_config_id: Annotated[str | None, Query(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
                                                description="seed 001's name for external_id")] = None,
    grid: Annotated[str | None, Query(min_length=1, max_length=100, description="a grid name or id")] = None,
    state: Annotated[Literal[JOB_STATES] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    engine: Engine = Depends(get_engine),
):
    if external_id is not None and seed_config_id is not None and external_id != seed_config_id:
        raise ApiError(422, "invalid_request", "external_id and seed_config_id name the same thing; give one",
                       [{"field": "seed_config_id", "message": "differs from external_id"}])
    rows = reports.list_jobs(engine, external_id or seed_config_id, grid_ref(grid) if grid else None, state, limit)
    return JSONResponse({"jobs": rows})


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
    """The job's first `limit` events in time order. The end of an attempt that succeeded, was cancelled or
    pruned comes from the attempt itself and has `id` null (docs/queue.md)."""
    return JSONResponse({"job_id": job_id, "events": reports.job_events(engine, job_id, limit)})


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(auth.submitter)],
             summary="Cancel a queued job now, or ask its worker to stop a running one")
def cancel_job(job_id: JobId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"ok": True, "job_id": job_id, "state": g.cancel_job(engine, job_id)})


@router.post("/jobs/{job_id}/retry", dependencies=[Depends(auth.submitter)],
             summary="Queue a failed or cancelled job again with fresh budgets")
def retry_job(job_id: JobId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"ok": True, "job_id": job_id, "state": g.retry_job(engine, job_id)})


@router.post("/jobs/{job_id}/resume", dependencies=[Depends(auth.submitter)],
             summary="Queue a pruned (or cancelled) job again; it continues from its checkpoint and is not pruned "
                     "again")
def resume_job(job_id: JobId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"ok": True, "job_id": job_id, "state": g.resume_job(engine, job_id)})
