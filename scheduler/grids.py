"""Grid lifecycle in the database: submit (dedup by job key), cancel, pause, resume; job cancel/retry/resume."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from common import schema as t
from common.db import is_sqlite, write_tx
from scheduler.queue import ANALYZE_AFTER_ROWS, refresh_planner_stats
from scheduler.spec import (ConfigValidator, GridError, GridSpec, JobSpec, canonical_json, expand, job_key,
                            search_probes, validate_jobs)

ExternalId = Callable[[str, dict[str, Any]], "str | None"]  # (trainer, config) -> the id its users know
FuseKey = Callable[[str, dict[str, Any]], "str | None"]  # (trainer, config) -> jobs sharing it may form a gang


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
    imported: int = 0  # done jobs stored as succeeded with their result (`gridfleet import`)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # done jobs left alone, and why


@dataclass
class DoneJob:
    """A job of the grid that already ran elsewhere (the seed's own result files): stored as succeeded with
    its result, so it is never trained here. Identity as submit's: {trainer, config, seed}."""
    config: dict[str, Any]
    seed: int
    result: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None


log = logging.getLogger("gridfleet.scheduler")


def _done_by_key(spec: GridSpec, keys: set[str], done: list[DoneJob]) -> dict[str, DoneJob]:
    out = {}
    for i, item in enumerate(done):
        try:
            key = job_key(spec.trainer, item.config, item.seed)
        except (TypeError, ValueError) as exc:
            raise GridError(f"done.{i}", f"values must be plain JSON (no NaN/inf): {exc}") from exc
        if key not in keys:
            raise GridError(f"done.{i}", f"its config and seed {item.seed} are not one of grid '{spec.name}''s jobs")
        out[key] = item
    return out


def _per_config(trainer: str, jobs, hook: ExternalId | FuseKey) -> dict[str, str | None]:
    by_config: dict[str, str | None] = {}  # once per distinct config: seeds share one
    out = {}
    for job in jobs:
        marker = canonical_json(job.config)
        if marker not in by_config:
            by_config[marker] = hook(trainer, job.config)
        out[job.key] = by_config[marker]
    return out


def submit_grid(engine: Engine, spec: GridSpec, validate_config: ConfigValidator, analyze: bool = True,
                external_id: ExternalId | None = None, done: list[DoneJob] | None = None,
                fuse_key: FuseKey | None = None) -> SubmitResult:
    """Store a grid and the jobs it expands to that are not already there. All or nothing.

    After adding ANALYZE_AFTER_ROWS jobs or more it refreshes the planner's statistics (`analyze=False`:
    don't; the benchmark uses it to show the slow plan). `external_id` gives each new job its
    jobs.external_id, and `fuse_key` its jobs.fuse_key (a hook of the same shape). `done` (import): those
    jobs are stored as succeeded with their result in the same transaction, so no worker can claim them
    first; a done job that is already there is imported only if it never ran (queued, no attempt), and
    otherwise skipped and listed in `skipped`."""
    jobs = expand(spec)  # may raise GridError; nothing is written before validation passes
    if spec.search is not None:
        # A search grid's jobs come from its sampler (scheduler/search.py); `jobs` are its points, checked here
        # at the ends of the searched ranges, and stored as jobs only when a trial asks for them.
        if done:
            raise GridError("done", "a search grid's jobs come from its sampler; import results into a plain grid")
        validate_jobs(spec, search_probes(spec, jobs), validate_config)
        planned, jobs = len(jobs) * spec.search.n_trials, []
    else:
        validate_jobs(spec, jobs, validate_config)
        planned = len(jobs)
    done_by_key = _done_by_key(spec, {job.key for job in jobs}, done or [])
    external = _per_config(spec.trainer, jobs, external_id) if external_id else {}
    fuse_keys = _per_config(spec.trainer, jobs, fuse_key) if fuse_key else {}
    now = time.time()
    spec_json = spec.model_dump(mode="json")
    dialect_insert = sqlite.insert if is_sqlite(engine) else postgresql.insert
    find_grid = select(t.grids.c.id, t.grids.c.trainer).where(t.grids.c.name == spec.name)
    with write_tx(engine) as conn:
        grid = conn.execute(find_grid).first()
        grid_id = None
        parent_id = None
        if spec.parent is not None:
            if spec.parent == spec.name:
                raise GridError("parent", f"grid '{spec.name}' cannot be its own parent")
            try:
                parent_id = grid_id_by_name(conn, spec.parent)
            except NotFound:
                raise GridError("parent", f"no grid named '{spec.parent}' to refine") from None
        if grid is None:
            # ON CONFLICT: a concurrent POST of the same new grid (Postgres) makes this wait for it and
            # insert nothing, instead of failing on the unique name; then the grid is read back.
            grid_id = conn.execute(
                dialect_insert(t.grids)
                .values(name=spec.name, trainer=spec.trainer, spec=spec_json, objective=spec.objective,
                        priority=spec.priority, max_attempts=spec.max_attempts, state="active",
                        created_at=now, updated_at=now, parent_id=parent_id)
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
        rows = [job_row(spec, grid_id, job, now, external.get(job.key), fuse_keys.get(job.key))
                for job in jobs if job.key not in existing_keys]
        if spec.search is not None:
            dialect_insert = sqlite.insert if is_sqlite(engine) else postgresql.insert
            conn.execute(dialect_insert(t.searches).values(grid_id=grid_id, lock_until=0.0, wake=0, state="running",
                                                           updated_at=now)
                         .on_conflict_do_update(index_elements=["grid_id"], set_={"state": "running",
                                                                                   "updated_at": now}))
        created, imported_ids = 0, []
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
        skipped = []
        if done_by_key:
            # Still inside this transaction: no worker sees the new jobs as queued before they are done.
            imported_ids, skipped = _import_done(conn, grid_id, done_by_key)
        if imported_ids:
            conn.execute(insert(t.events), [{"job_id": job_id, "time": now, "kind": "imported",
                                             "message": "result imported; the job was not trained here"}
                                            for job_id in imported_ids])
    if analyze and created >= ANALYZE_AFTER_ROWS:
        # Fresh statistics keep the claim on its index (see refresh_planner_stats). The jobs are stored
        # already: a failure here only costs speed, so it is logged and the submit stays a success.
        try:
            refresh_planner_stats(engine)
        except SQLAlchemyError as exc:
            log.warning("ANALYZE jobs after adding %d jobs failed: %s", created,
                        type(getattr(exc, "orig", None) or exc).__name__)
    return SubmitResult(grid_id=grid_id, name=spec.name, created=created, existing=len(jobs) - created,
                        total=planned, new_grid=new_grid, imported=len(imported_ids), skipped=skipped)


def job_row(spec: GridSpec, grid_id: int, job: JobSpec, now: float, external_id: str | None = None,
            fuse_key: str | None = None) -> dict[str, Any]:
    """A new queued job of the grid, as submit stores it (a search's trials are stored through this too)."""
    return {
        "grid_id": grid_id, "key": job.key, "trainer": spec.trainer, "config": job.config,
        "seed": job.seed, "priority": spec.priority, "gpus": spec.resources.gpus,
        "resources": spec.resources.model_dump(), "code_rev": spec.code_rev, "store": spec.store, "state": "queued",
        "not_before": 0.0, "cancel_requested": False, "max_attempts": spec.max_attempts,
        "attempts": 0, "errors": 0, "losses": 0, "preemptions": 0, "created_at": now,
        "external_id": external_id, "fuse_key": fuse_key,
    }


def _done_values(item: DoneJob) -> dict[str, Any]:
    return {"state": "succeeded", "result": item.result, "started_at": item.started_at,
            "finished_at": item.finished_at, "progress_done": 1.0, "progress_total": 1.0}


def _import_done(conn, grid_id: int, done: dict[str, DoneJob]) -> tuple[list[int], list[dict[str, Any]]]:
    """Import results into the grid's stored jobs: only into one that never ran. A job that ran here keeps its
    own result (skipped, with the reason); importing the same result twice changes nothing."""
    imported, skipped = [], []
    keys, found = list(done), []
    for start in range(0, len(keys), 1000):  # bounded IN lists (SQLite caps bound parameters)
        found += conn.execute(select(t.jobs.c.id, t.jobs.c.key, t.jobs.c.state, t.jobs.c.attempts, t.jobs.c.result)
                              .where(t.jobs.c.grid_id == grid_id, t.jobs.c.key.in_(keys[start:start + 1000]))).all()
    for row in sorted(found, key=lambda r: r.id):
        item = done[row.key]
        if row.state == "succeeded" and row.attempts == 0 and _loads(row.result) == item.result:
            continue  # imported before: nothing to do
        if row.state == "queued" and row.attempts == 0:
            # The claim cannot take it in between: the WHERE repeats the check inside this transaction.
            changed = conn.execute(
                update(t.jobs).where(t.jobs.c.id == row.id, t.jobs.c.state == "queued", t.jobs.c.attempts == 0)
                .values(**_done_values(item))
            ).rowcount
            if changed:
                imported.append(row.id)
                continue
        reason = ("imported before with another result; that one is kept" if row.attempts == 0 and
                  row.state == "succeeded" else f"it is {row.state} after {row.attempts} attempt(s) here; "
                  "its own state and result are kept")
        skipped.append({"job_id": row.id, "state": row.state, "attempts": row.attempts, "reason": reason})
    return imported, skipped


def _loads(value):
    return json.loads(value) if isinstance(value, str) else value


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
        if state in ("succeeded", "failed", "cancelled", "pruned"):
            raise Conflict(f"job {job_id} already ended as {state}; nothing to cancel")
        _cancel_jobs(conn, t.jobs.c.id == job_id)
        return "cancelled" if state == "queued" else "cancel_requested"


def _refuse_in_cancelled_grid(conn, job_id: int) -> None:
    """A job of a cancelled grid is not queued again on its own: the grid's resume does that."""
    grid_state = conn.execute(
        select(t.grids.c.state).join(t.jobs, t.jobs.c.grid_id == t.grids.c.id).where(t.jobs.c.id == job_id)
    ).scalar_one()
    if grid_state == "cancelled":
        raise Conflict(f"job {job_id} belongs to a cancelled grid; resume the grid first")


def retry_job(engine: Engine, job_id: int) -> str:
    """Queue a failed or cancelled job again with fresh error, loss and preemption budgets."""
    with write_tx(engine) as conn:
        state = _job_state(conn, job_id)
        if state not in ("failed", "cancelled"):
            raise Conflict(f"job {job_id} is {state}; only failed or cancelled jobs can be retried")
        _refuse_in_cancelled_grid(conn, job_id)
        conn.execute(
            update(t.jobs).where(t.jobs.c.id == job_id)
            .values(state="queued", errors=0, losses=0, preemptions=0, not_before=0.0, cancel_requested=False,
                    finished_at=None)
        )
        conn.execute(insert(t.events).values(job_id=job_id, time=time.time(), kind="retry",
                                             message=f"retried by a user (was {state})"))
    return "queued"


def resume_job(engine: Engine, job_id: int) -> str:
    """Queue a pruned (or cancelled) job again: it continues from its checkpoint (the pointer stays), and no
    prune rule stops it again (prune_exempt): a user who resumes it by hand disagreed with the rule."""
    with write_tx(engine) as conn:
        row = conn.execute(select(t.jobs.c.state, t.jobs.c.pruned_step, t.jobs.c.pruned_by, t.jobs.c.step)
                           .where(t.jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job {job_id}")
        if row.state not in ("pruned", "cancelled"):
            raise Conflict(f"job {job_id} is {row.state}; only pruned or cancelled jobs can be resumed")
        _refuse_in_cancelled_grid(conn, job_id)
        # The fence stays as it is: only the state of a job nobody holds changes (the WHERE repeats it).
        changed = conn.execute(
            update(t.jobs).where(t.jobs.c.id == job_id, t.jobs.c.state == row.state)
            .values(state="queued", not_before=0.0, cancel_requested=False, finished_at=None, prune_exempt=True,
                    pruned_step=None, pruned_by=None)
        ).rowcount
        if not changed:
            raise Conflict(f"job {job_id} changed state meanwhile; look at it again")
        was = f"pruned at step {row.pruned_step}: {row.pruned_by}" if row.state == "pruned" else row.state
        conn.execute(insert(t.events).values(
            job_id=job_id, time=time.time(), kind="resume",
            message=f"resumed by a user from step {row.step} (was {was}); no prune rule stops it again"))
    return "queued"
