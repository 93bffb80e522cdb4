"""Grids: submit (dedup by job key), import (submit with done jobs), list, get, cancel/pause/resume, results
as JSON or CSV."""
from __future__ import annotations

import csv
import io
import logging
from typing import Literal

from fastapi import Depends, Query
from fastapi.responses import Response
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from api import auth
from api.deps import get_engine, get_searches
from api.errors import ApiError
from api.models import INT32_MAX, ImportGrid
from api.responses import JSONResponse
from api.routes.common import grid_ref, router as make_router
from scheduler import grids as g
from scheduler import reports
from scheduler.search import Searches
from scheduler.spec import GridError, GridSpec
from worker import trainers

router = make_router("grids")
log = logging.getLogger("gridfleet.api")
OBJECTIVE_MAX = 200  # grids.objective is VARCHAR(200)


def _check_storable(spec: GridSpec) -> None:
    """Limits of the database columns the spec model does not know about."""
    for i, seed in enumerate(spec.seeds):
        if not -INT32_MAX - 1 <= seed <= INT32_MAX:
            raise GridError(f"seeds.{i}", f"seed {seed} is out of range; seeds must fit in 32 bits")
    if spec.objective and len(spec.objective) > OBJECTIVE_MAX:
        raise GridError("objective", f"at most {OBJECTIVE_MAX} characters")


def _submit(engine: Engine, spec: GridSpec, done: list[g.DoneJob] | None = None) -> g.SubmitResult:
    try:
        _check_storable(spec)
        try:
            return g.submit_grid(engine, spec, trainers.validate_config, external_id=trainers.external_id, done=done,
                                 fuse_key=trainers.fuse_key)
        except IntegrityError:  # a concurrent POST created the same grid first: add to it instead
            return g.submit_grid(engine, spec, trainers.validate_config, external_id=trainers.external_id, done=done,
                                 fuse_key=trainers.fuse_key)
    except trainers.UnknownTrainer as exc:
        raise ApiError(422, "unknown_trainer", str(exc), [{"field": "trainer", "message": str(exc)}],
                       extra={"known_trainers": trainers.known_trainers()}) from None
    except trainers.InvalidConfig as exc:
        fields = [{"field": field, "message": msg} for field, msg in exc.errors]
        raise ApiError(422, "invalid_config", str(exc), fields) from None
    except GridError as exc:
        raise ApiError(422, "invalid_grid", str(exc), [{"field": exc.field, "message": exc.message}]) from None


@router.post("/grids", status_code=201, dependencies=[Depends(auth.submitter)],
             summary="Submit a grid; re-posting the same name adds only configs not already there")
def post_grid(spec: GridSpec, engine: Engine = Depends(get_engine), searches: Searches = Depends(get_searches)):
    result = _submit(engine, spec)  # refreshes the planner's statistics after adding many jobs
    if spec.search is not None:  # the first trials, now; the search loop would find them in a moment anyway
        searches.forget_running()
        try:
            searches.advance(result.grid_id)
        except Exception:  # noqa: BLE001 - the grid is stored; the search loop asks again
            log.exception("asking the first trials of grid %s failed; the search loop tries again", result.name)
    return JSONResponse(
        {"grid_id": result.grid_id, "name": result.name, "created": result.created,
         "existing": result.existing, "total": result.total, "new_grid": result.new_grid},
        status_code=201 if result.new_grid else 200,
    )


@router.post("/grids/import", status_code=201, dependencies=[Depends(auth.submitter)],
             summary="Submit a grid with some of its jobs already done elsewhere (their results, no training)")
def import_grid(body: ImportGrid, engine: Engine = Depends(get_engine)):
    done = [g.DoneJob(config=d.config, seed=d.seed, result=d.result, started_at=d.started_at,
                      finished_at=d.finished_at) for d in body.done]
    result = _submit(engine, body.grid, done)
    return JSONResponse(
        {"grid_id": result.grid_id, "name": result.name, "created": result.created,
         "existing": result.existing, "total": result.total, "new_grid": result.new_grid,
         "imported": result.imported, "skipped": result.skipped},
        status_code=201 if result.new_grid else 200,
    )


@router.get("/grids", dependencies=[Depends(auth.any_role)])
def list_grids(engine: Engine = Depends(get_engine)):
    rows = reports.list_grids(engine)
    for row in rows:
        row.pop("spec", None)
    return JSONResponse({"grids": rows})


@router.get("/grids/{grid}", dependencies=[Depends(auth.any_role)])
def get_grid(grid: str, engine: Engine = Depends(get_engine)):
    return JSONResponse(reports.grid_summary(engine, grid_ref(grid)))


def _control(action):
    def endpoint(grid: str, engine: Engine = Depends(get_engine)):
        ref = grid_ref(grid)
        state = action(engine, ref)
        return JSONResponse({"ok": True, "grid": grid, "state": state})

    return endpoint


router.post("/grids/{grid}/cancel", dependencies=[Depends(auth.submitter)], name="cancel_grid",
            summary="Cancel queued jobs now; running jobs stop at their next heartbeat")(_control(g.cancel_grid))
router.post("/grids/{grid}/pause", dependencies=[Depends(auth.submitter)], name="pause_grid",
            summary="Stop claiming the grid's jobs; running ones continue")(_control(g.pause_grid))
router.post("/grids/{grid}/resume", dependencies=[Depends(auth.submitter)], name="resume_grid",
            summary="Make a paused or cancelled grid active again")(_control(g.resume_grid))


@router.get("/grids/{grid}/results", dependencies=[Depends(auth.any_role)])
def grid_results(grid: str, format: Literal["json", "csv"] = Query("json"),  # noqa: A002 - the query name
                 engine: Engine = Depends(get_engine)):
    ref = grid_ref(grid)
    rows = reports.grid_results(engine, ref)
    if format == "json":
        return JSONResponse({"grid": grid, "results": rows})
    columns, flat = reports.results_table(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat)
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{grid}-results.csv"'})


@router.get("/grids/{grid}/rungs", dependencies=[Depends(auth.any_role)],
            summary="The grid's ASHA decisions in the order they were made: job, rung, step, value, promoted")
def grid_rungs(grid: str, engine: Engine = Depends(get_engine)):
    return JSONResponse({"grid": grid, "rungs": reports.prune_rungs(engine, grid_ref(grid))})
