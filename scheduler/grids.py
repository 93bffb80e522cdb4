"""Grid lifecycle in the database: submit (dedup by job key), cancel, pause, resume; job cancel/retry."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from common import schema as t
from common.db import is_sqlite, write_tx
from scheduler.queue import ANALYZE_AFTER_ROWS, refresh_planner_stats
from scheduler.spec import ConfigValidator, GridError, GridSpec, expand, validate_jobs


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    """The request is valid but the thing is in the wrong state for it."""


@dataclass
class SubmitResult:
    grid_id: int
    name: str
    created: int
    existing: int
    total: int
    new_grid: bool


log = logging.getLogger("gridfleet.scheduler")


def submit_grid(engine: Engine, spec: GridSpec, validate_config: ConfigValidator, analyze: bool = True) -> SubmitResult:
    """Store a grid and the jobs it expands to that are not already there. All or nothing.

    After adding ANALYZE_AFTER_ROWS jobs or more it refreshes the planner's statistics (`analyze=False`:
    don't; the benchmark uses it to show the slow plan)."""
    jobs = expand(spec)  # may raise GridError; nothing is written before validation passes
    validate_jobs(spec, jobs, validate_config)
    now = time.time()
    spec_json = spec.model_dump(mode="json")
    dialect_insert = sqlite.insert if is_sqlite(engine) else postgresql.insert
    find_grid = select(t.grids.c.id, t.grids.c.trainer).where(t.grids.c.name == spec.name)
    with write_tx(engine) as conn:
        grid = conn.execute(find_grid).first()
        grid_id = None
        if grid is None:
            # ON CONFLICT: a concurrent POST of the same new grid (Postgres) makes this wait for it and
            # insert nothing, instead of failing on the unique name; then the grid is read back.
            grid_id = conn.execute(
                dialect_insert(t.grids)
                .values(name=spec.name, trainer=spec.trainer, spec=spec_json, objective=spec.objective,
                        priority=spec.priority, max_attempts=spec.max_attempts, state="active",
                        created_at=now, updated_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(t.grids.c.id)
            ).scalar()
            if grid_id is None:
                grid = conn.execute(find_grid).one()
        if grid is not None and grid.trainer != spec.trainer:
            raise GridError(
                "trainer",
                f"grid '{spec.name}' already exists with trainer '{grid.trainer}'; "
                f"use another name for a '{spec.trainer}' grid",
            )
        new_grid = grid is None
        if new_grid:
            existing_keys: set[str] = set()
        else:
            grid_id = grid.id
            conn.execute(
                update(t.grids).where(t.grids.c.id == grid_id)
                .values(spec=spec_json, objective=spec.objective, updated_at=now)
            )
            existing_keys = set(conn.execute(select(t.jobs.c.key).where(t.jobs.c.grid_id == grid_id)).scalars())
        rows = [
            {
                "grid_id": grid_id, "key": job.key, "trainer": spec.trainer, "config": job.config,
                "seed": job.seed, "priority": spec.priority, "gpus": spec.resources.gpus,
                "resources": spec.resources.model_dump(), "code_rev": spec.code_rev, "store": spec.store, "state": "queued",
                "not_before": 0.0, "cancel_requested": False, "max_attempts": spec.max_attempts,
                "attempts": 0, "errors": 0, "losses": 0, "preemptions": 0, "created_at": now,
            }
            for job in jobs
            if job.key not in existing_keys
        ]
        created = 0
        if rows:
            # A concurrent POST of the same grid may have inserted some keys: skip them, never duplicate,
            # and count only the rows this call really inserted.
            stmt = (
                dialect_insert(t.jobs)
                .on_conflict_do_nothing(index_elements=["grid_id", "key"])
                .returning(t.jobs.c.id)
            )
            for start in range(0, len(rows), 5000):
                created += len(conn.execute(stmt, rows[start:start + 5000]).all())
    if analyze and created >= ANALYZE_AFTER_ROWS:
        # Fresh statistics keep the claim on its index (see refresh_planner_stats). The jobs are stored
        # already: a failure here only costs speed, so it is logged and the submit stays a success.
        try:
            refresh_planner_stats(engine)
        except SQLAlchemyError as exc:
            log.warning("ANALYZE jobs after adding %d jobs failed: %s", created,
                        type(getattr(exc, "orig", None) or exc).__name__)
    return SubmitResult(grid_id=grid_id, name=spec.name, created=created, existing=len(jobs) - created,
                        total=len(jobs), new_grid=new_grid)


def grid_id_by_name(conn, name_or_id: str | int) -> int:
    column = t.grids.c.id if isinstance(name_or_id, int) or str(name_or_id).isdigit() else t.grids.c.name
    value = int(name_or_id) if column is t.grids.c.id else name_or_id
    found = conn.execute(select(t.grids.c.id).where(column == value)).scalar()
    if found is None:
        raise NotFound(f"no grid named or numbered '{name_or_id}'")
    return found


def _set_grid_state(engine: Engine, grid: str | int, allowed_from: tuple[str, ...], new_state: str) -> str:
    with write_tx(engine) as conn:
        grid_id = grid_id_by_name(conn, grid)
        state = conn.execute(select(t.grids.c.state).where(t.grids.c.id == grid_id)).scalar_one()
        if state == new_state:
            return state
        if state not in allowed_from:
            raise Conflict(f"grid '{grid}' is {state}; it can become {new_state} only from {' or '.join(allowed_from)}")
        conn.execute(update(t.grids).where(t.grids.c.id == grid_id).values(state=new_state, updated_at=time.time()))
        if new_state == "cancelled":
            _cancel_jobs(conn, t.jobs.c.grid_id == grid_id)
    return new_state


def pause_grid(engine: Engine, grid: str | int) -> str:
    """Paused grids keep their running jobs; no new job of theirs is claimed."""
    return _set_grid_state(engine, grid, ("active",), "paused")


def resume_grid(engine: Engine, grid: str | int) -> str:
    """Resuming a cancelled grid lets its cancelled jobs be retried; it requeues nothing by itself."""
    return _set_grid_state(engine, grid, ("paused", "cancelled"), "active")


def cancel_grid(engine: Engine, grid: str | int) -> str:
    return _set_grid_state(engine, grid, ("active", "paused"), "cancelled")


def _cancel_jobs(conn, where) -> None:
    now = time.time()
    conn.execute(update(t.jobs).where(where, t.jobs.c.state == "queued").values(state="cancelled", finished_at=now))
    # Running jobs learn it from their next heartbeat reply and finish as cancelled.
    conn.execute(update(t.jobs).where(where, t.jobs.c.state == "running").values(cancel_requested=True))


def _job_state(conn, job_id: int) -> str:
    state = conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == job_id)).scalar()
    if state is None:
        raise NotFound(f"no job {job_id}")
    return state


def cancel_job(engine: Engine, job_id: int) -> str:
    """Queued: cancelled now. Running: cancel requested (the worker stops within one heartbeat)."""
    with write_tx(engine) as conn:
        state = _job_state(conn, job_id)
        if state in ("succeeded", "failed", "cancelled"):
            raise Conflict(f"job {job_id} already ended as {state}; nothing to cancel")
        _cancel_jobs(conn, t.jobs.c.id == job_id)
        return "cancelled" if state == "queued" else "cancel_requested"


def retry_job(engine: Engine, job_id: int) -> str:
    """Queue a failed or cancelled job again with fresh error, loss and preemption budgets."""
    with write_tx(engine) as conn:
        state = _job_state(conn, job_id)
        if state not in ("failed", "cancelled"):
            raise Conflict(f"job {job_id} is {state}; only failed or cancelled jobs can be retried")
        grid_state = conn.execute(
            select(t.grids.c.state).join(t.jobs, t.jobs.c.grid_id == t.grids.c.id).where(t.jobs.c.id == job_id)
        ).scalar_one()
        if grid_state == "cancelled":
            raise Conflict(f"job {job_id} belongs to a cancelled grid; resume the grid first")
        conn.execute(
            update(t.jobs).where(t.jobs.c.id == job_id)
            .values(state="queued", errors=0, losses=0, preemptions=0, not_before=0.0, cancel_requested=False,
                    finished_at=None)
        )
        conn.execute(insert(t.events).values(job_id=job_id, time=time.time(), kind="retry",
                                             message=f"retried by a user (was {state})"))
    return "queued"
