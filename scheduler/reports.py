"""Read models for the API and CLI: grid summaries with progress and best result, results, job views."""
from __future__ import annotations

import heapq
import itertools
import json
import math
import time
from typing import Any

from sqlalchemy import Engine, exists, func, select

from common import schema as t
from common.db import read_tx
from scheduler.grids import NotFound, grid_id_by_name
from scheduler.policy import JOB_STATES, TERMINAL_STATES
from scheduler.queue import ENDS_IN_ATTEMPT_ROW, attempt_end_event
from scheduler.search import search_summary


def _loads(value):
    return json.loads(value) if isinstance(value, str) else value


def _objective_value(result: dict | None, metric: str) -> float | None:
    if not isinstance(result, dict):
        return None
    value = result.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _best(rows, objective: str | None) -> dict | None:
    if not objective:
        return None
    direction, metric = objective.split(":", 1)
    scored = [(v, r) for r in rows if (v := _objective_value(_loads(r.result), metric)) is not None]
    if not scored:
        return None
    value, row = (min if direction == "min" else max)(scored, key=lambda pair: pair[0])
    return {"job_id": row.id, "metric": metric, "value": value, "config": _loads(row.config), "seed": row.seed}


def grid_summary(engine: Engine, grid: str | int) -> dict[str, Any]:
    with read_tx(engine) as conn:
        grid_id = grid_id_by_name(conn, grid)
        g = conn.execute(select(t.grids).where(t.grids.c.id == grid_id)).mappings().one()
        counts = dict(
            conn.execute(
                select(t.jobs.c.state, func.count()).where(t.jobs.c.grid_id == grid_id).group_by(t.jobs.c.state)
            ).all()
        )
        running = conn.execute(
            select(t.jobs.c.progress_done, t.jobs.c.progress_total)
            .where(t.jobs.c.grid_id == grid_id, t.jobs.c.state == "running")
        ).all()
        finished = conn.execute(
            select(t.jobs.c.id, t.jobs.c.result, t.jobs.c.config, t.jobs.c.seed)
            .where(t.jobs.c.grid_id == grid_id, t.jobs.c.state == "succeeded")
        ).all()
        parent = conn.execute(select(t.grids.c.id, t.grids.c.name).where(t.grids.c.id == g["parent_id"])).first() \
            if g["parent_id"] is not None else None
        children = conn.execute(select(t.grids.c.id, t.grids.c.name).where(t.grids.c.parent_id == grid_id)
                                .order_by(t.grids.c.id)).all()
        search = search_summary(conn, grid_id, _loads(g["spec"]))  # None unless the grid has a `search:`
    total = sum(counts.values())
    done = sum(counts.get(s, 0) for s in TERMINAL_STATES)
    partial = sum(min(1.0, (d or 0) / tot) for d, tot in running if tot)
    planned = max(total, search["n_trials"]) if search and search["state"] != "done" else total  # trials to come
    return {
        "id": g["id"], "name": g["name"], "trainer": g["trainer"], "state": g["state"],
        "objective": g["objective"], "priority": g["priority"], "created_at": g["created_at"],
        "total": total, "counts": {s: counts.get(s, 0) for s in JOB_STATES},
        "progress": (done + partial) / planned if planned else 1.0,
        "best": _best(finished, g["objective"]),
        # `gridfleet refine` links a follow-up grid to the grid it took its best configs from.
        "parent": {"id": parent.id, "name": parent.name} if parent else None,
        "children": [{"id": c.id, "name": c.name} for c in children],
        "search": search,
        "spec": _loads(g["spec"]),
    }


def list_grids(engine: Engine) -> list[dict[str, Any]]:
    with read_tx(engine) as conn:
        ids = conn.execute(select(t.grids.c.id).order_by(t.grids.c.id)).scalars().all()
    return [grid_summary(engine, grid_id) for grid_id in ids]


def grid_results(engine: Engine, grid: str | int) -> list[dict[str, Any]]:
    """One row per job: id, state, seed, config, result, checkpoint pointer; best first when the grid has
    an objective."""
    with read_tx(engine) as conn:
        grid_id = grid_id_by_name(conn, grid)
        objective = conn.execute(select(t.grids.c.objective).where(t.grids.c.id == grid_id)).scalar()
        rows = conn.execute(
            select(t.jobs.c.id, t.jobs.c.state, t.jobs.c.seed, t.jobs.c.config, t.jobs.c.result,
                   t.jobs.c.attempts, t.jobs.c.step, t.jobs.c.checkpoint, t.jobs.c.external_id,
                   t.jobs.c.pruned_step, t.jobs.c.pruned_by)
            .where(t.jobs.c.grid_id == grid_id).order_by(t.jobs.c.id)
        ).all()
    results = [
        {"job_id": r.id, "state": r.state, "seed": r.seed, "attempts": r.attempts, "step": r.step,
         "external_id": r.external_id,
         "config": _loads(r.config), "result": _loads(r.result), "checkpoint": _loads(r.checkpoint),
         **({"pruned": pruned_view(r.pruned_step, r.pruned_by)} if r.state == "pruned" else {})}
        for r in rows
    ]
    if objective:
        direction, metric = objective.split(":", 1)
        sign = 1.0 if direction == "min" else -1.0

        def rank(row):
            value = _objective_value(row["result"], metric)
            return (value is None, sign * value if value is not None else 0.0, row["job_id"])

        results.sort(key=rank)
    return results


def pruned_view(step: int | None, by: str | None) -> dict[str, Any]:
    """How a pruned job is shown: the step it was stopped at, the rule's reason, and ASHA's rung when the
    reason names one (scheduler/pruning.py writes "... at rung K (step S)")."""
    rung = None
    if by and " at rung " in by:
        head = by.split(" at rung ", 1)[1].split(" ", 1)[0]
        rung = int(head) if head.isdigit() else None
    return {"step": step, "by": by, "rung": rung}


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, child in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), child, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value
    return out


def results_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flat rows for CSV: job_id, state, seed, attempts, external_id (when there is one), config.*, result.*
    (list values as JSON)."""
    flat = []
    for row in rows:
        out = {"job_id": row["job_id"], "state": row["state"], "seed": row["seed"], "attempts": row["attempts"]}
        if row.get("pruned"):  # stopped early: the step (and rung) it reached, the rule that stopped it
            out["pruned_at_step"], out["pruned_by"] = row["pruned"]["step"], row["pruned"]["by"]
        if row.get("external_id") is not None:  # a column only for trainers that have one (seed 001's id)
            out["external_id"] = row["external_id"]
        flatten("config", row["config"], out)
        flatten("result", row["result"] or {}, out)
        flat.append(out)
    columns: list[str] = []
    for out in flat:
        columns.extend(c for c in out if c not in columns)
    return columns, flat


def job_detail(engine: Engine, job_id: int) -> dict[str, Any]:
    with read_tx(engine) as conn:
        job = conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().first()
        if job is None:
            raise NotFound(f"no job {job_id}")
        attempts = conn.execute(
            select(t.attempts).where(t.attempts.c.job_id == job_id).order_by(t.attempts.c.started_at)
        ).mappings().all()
        grid_name = conn.execute(select(t.grids.c.name).where(t.grids.c.id == job["grid_id"])).scalar_one()
    out = {k: _loads(v) if k in ("config", "resources", "checkpoint", "result") else v for k, v in job.items()}
    out["grid"] = grid_name
    if out["state"] == "pruned":
        out["pruned"] = pruned_view(out["pruned_step"], out["pruned_by"])
    out["attempt_history"] = [dict(a) for a in attempts]
    return out


def list_jobs(engine: Engine, external_id: str | None = None, grid: str | int | None = None,
              state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Jobs by external id (seed 001's config id: on its index), grid and/or state, newest last."""
    with read_tx(engine) as conn:
        query = (select(t.jobs.c.id, t.jobs.c.grid_id, t.grids.c.name.label("grid"), t.jobs.c.state,
                        t.jobs.c.seed, t.jobs.c.external_id, t.jobs.c.attempts, t.jobs.c.config, t.jobs.c.result,
                        t.jobs.c.pruned_step, t.jobs.c.pruned_by)
                 .join(t.grids, t.grids.c.id == t.jobs.c.grid_id))
        if external_id is not None:
            query = query.where(t.jobs.c.external_id == external_id)
        if grid is not None:
            query = query.where(t.jobs.c.grid_id == grid_id_by_name(conn, grid))
        if state is not None:
            query = query.where(t.jobs.c.state == state)
        rows = conn.execute(query.order_by(t.jobs.c.id).limit(limit)).mappings().all()
    return [{**{k: v for k, v in r.items() if k not in ("id", "config", "result", "pruned_step", "pruned_by")},
             "job_id": r["id"], "config": _loads(r["config"]), "result": _loads(r["result"]),
             **({"pruned": pruned_view(r["pruned_step"], r["pruned_by"])} if r["state"] == "pruned" else {})}
            for r in rows]


def job_metrics(engine: Engine, job_id: int, after_step: int | None = None, limit: int = 10_000) -> list[dict]:
    with read_tx(engine) as conn:
        if conn.execute(select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first() is None:
            raise NotFound(f"no job {job_id}")
        query = select(t.metrics).where(t.metrics.c.job_id == job_id)
        if after_step is not None:
            query = query.where(t.metrics.c.step > after_step)
        rows = conn.execute(query.order_by(t.metrics.c.step, t.metrics.c.id).limit(limit)).mappings().all()
    return [{"step": r["step"], "time": r["time"], "attempt_id": r["attempt_id"], **_loads(r["values"])} for r in rows]


def job_events(engine: Engine, job_id: int, limit: int = 1000) -> list[dict]:
    """The job's first `limit` events in time order: its events rows, and the end of each attempt that ended in
    ENDS_IN_ATTEMPT_ROW, read from the attempt row (no finish writes an events row for those; one that an
    earlier version stored is shown once, not twice)."""
    a, e = t.attempts, t.events
    with read_tx(engine) as conn:
        if conn.execute(select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first() is None:
            raise NotFound(f"no job {job_id}")
        rows = conn.execute(select(e).where(e.c.job_id == job_id).order_by(e.c.id).limit(limit)).mappings().all()
        ended = conn.execute(
            select(a.c.id, a.c.job_id, a.c.outcome, a.c.ended_at, a.c.error)
            .where(a.c.job_id == job_id, a.c.outcome.in_(ENDS_IN_ATTEMPT_ROW), a.c.ended_at.is_not(None),
                   ~exists().where(e.c.attempt_id == a.c.id, e.c.kind == a.c.outcome))
            .order_by(a.c.ended_at)).all()
    # The rows keep their order; each attempt's end goes in after the rows of its time or earlier.
    events = heapq.merge([dict(r) for r in rows], [attempt_end_event(attempt) for attempt in ended],
                         key=lambda event: event["time"])
    return list(itertools.islice(events, limit))


def list_workers(engine: Engine, stale_after: float = 120.0) -> list[dict]:
    """Every worker; `state` (busy or idle) and `current_job_id` (its lowest running job) come from the jobs
    it runs now: the hot path writes no worker row per job (scheduler/queue.py, WORKER_SEEN)."""
    now = time.time()
    hidden = ("secret_hash", "state", "current_job_id")  # the hash is no one's business; the other two: below
    shown = [c for c in t.workers.c if c.name not in hidden]
    running = (select(t.running.c.worker_id, func.min(t.running.c.job_id).label("job_id"))
               .group_by(t.running.c.worker_id).subquery())  # the running jobs (a trigger keeps the table)
    with read_tx(engine) as conn:
        rows = conn.execute(
            select(*shown, running.c.job_id).outerjoin_from(t.workers, running, running.c.worker_id == t.workers.c.id)
            .order_by(t.workers.c.registered_at)).mappings().all()
    out = []
    for r in rows:
        worker = {k: _loads(v) if k in ("gpus", "trainers", "resources") else v for k, v in r.items() if k != "job_id"}
        out.append({**worker, "state": "idle" if r["job_id"] is None else "busy", "current_job_id": r["job_id"],
                    "alive": now - r["last_seen_at"] < stale_after})
    return out


def worker_events(engine: Engine, worker_id: str) -> list[dict[str, Any]]:
    with read_tx(engine) as conn:
        if conn.execute(select(t.workers.c.id).where(t.workers.c.id == worker_id)).first() is None:
            raise NotFound(f"no worker {worker_id}")
        rows = conn.execute(
            select(t.worker_events.c.time, t.worker_events.c.kind, t.worker_events.c.message)
            .where(t.worker_events.c.worker_id == worker_id).order_by(t.worker_events.c.id)
        ).mappings().all()
    return [dict(r) for r in rows]


def running_jobs(engine: Engine, grid_id: int) -> list[dict[str, Any]]:
    with read_tx(engine) as conn:
        rows = conn.execute(
            select(t.jobs.c.id, t.jobs.c.attempts, t.jobs.c.step, t.jobs.c.progress_done, t.jobs.c.progress_total,
                   t.jobs.c.config, t.jobs.c.attempt_id, t.jobs.c.checkpoint)
            .join_from(t.running, t.jobs, t.jobs.c.id == t.running.c.job_id)  # not every job of the grid
            .where(t.jobs.c.grid_id == grid_id, t.jobs.c.state == "running").order_by(t.jobs.c.id)
        ).mappings().all()
    return [{**r, "config": _loads(r["config"]), "checkpoint": _loads(r["checkpoint"])} for r in rows]


def latest_metrics(engine: Engine, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The values of each job's newest metrics row."""
    return {job_id: row["values"] for job_id, row in latest_metric_rows(engine, job_ids).items()}


def latest_metric_rows(engine: Engine, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The newest metrics row of each job: its step, attempt_id and values."""
    if not job_ids:
        return {}
    with read_tx(engine) as conn:
        newest = (
            select(func.max(t.metrics.c.id)).where(t.metrics.c.job_id.in_(job_ids)).group_by(t.metrics.c.job_id)
        )
        rows = conn.execute(select(t.metrics.c.job_id, t.metrics.c.step, t.metrics.c.attempt_id, t.metrics.c["values"])
                            .where(t.metrics.c.id.in_(newest))).all()
    return {r.job_id: {"step": r.step, "attempt_id": r.attempt_id, "values": _loads(r[3])} for r in rows}


def prune_rungs(engine: Engine, grid: str | int) -> list[dict[str, Any]]:
    """ASHA's record of the grid (scheduler/pruning.py): each job's value at each rung it reached and whether
    it went on, in the order the decisions were made."""
    with read_tx(engine) as conn:
        grid_id = grid_id_by_name(conn, grid)
        rows = conn.execute(select(t.prune_rungs.c.job_id, t.prune_rungs.c.rung, t.prune_rungs.c.step,
                                   t.prune_rungs.c.value, t.prune_rungs.c.promoted, t.prune_rungs.c.time)
                            .where(t.prune_rungs.c.grid_id == grid_id).order_by(t.prune_rungs.c.id)).mappings().all()
    return [dict(r) for r in rows]
