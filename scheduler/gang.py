"""Gang claims: up to K queued jobs of one grid that share a fuse key, claimed, heartbeated and finished
together, each member with its own attempt, fence and lease (docs/gang_claims.md).

Read `claim_gang`, `heartbeat_gang` and `finish_gang` in that order; each is one statement on Postgres (a
data-modifying CTE run in autocommit mode on the Queue's raw psycopg connections, as the single-job path
does) and the same steps inside one `BEGIN IMMEDIATE` transaction on SQLite. A gang's first job is the one a
single claim would take (same filters, same priority order), so K = 1 claims exactly what `Queue.claim`
does. Every member of a batched write is fenced on its own by job id, attempt id and worker id: a stale
member is refused (and may regain its job, as in the single path) while the others are written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable

from psycopg.types.json import Json
from sqlalchemy import bindparam, text

from common import schema as t
from common.db import write_tx
from scheduler.claim_sql import WORKER_SEEN, WORKER_SEEN_OF, ClaimFilters, claimable, pick
from scheduler.claim_sql import pyformat as _pyformat
from scheduler.queue import _ROW_FREE_OUTCOMES, ENDS_IN_ATTEMPT_ROW, NEW_ATTEMPT, OUTCOMES, ClaimedJob, Metric, Queue, \
    Reply, _finish_message, _json, _stale, new_id

# A gang heartbeat's or finish's: only when some member's fenced UPDATE (CTE `job`) held.
_GANG_WORKER_SEEN = WORKER_SEEN_OF.format(worker="id = :wid AND EXISTS (SELECT 1 FROM job)")
_COLUMNS = "id, grid_id, priority, trainer, config, seed, resources, code_rev, store, checkpoint, attempts"
# The first job: the one Queue.claim would take (claim_sql.pick: same filters, from the Queue's claim floor).
_FIRST_COLUMNS = "claimable.job_id AS id, claimable.grid_id, -claimable.rank AS priority, claimable.fuse_key"
# The members: claimable jobs of the first job's grid and fuse key, from the first job on in claim order (no
# claimable one of them comes before it: the first job is the first claimable of all). The row comparison
# starts the scan of ix_claimable_gang there instead of at the claimed jobs the grid left behind.
_SAME_KEY = """
    claimable.grid_id = {first}.grid_id AND claimable.fuse_key = {first}.fuse_key
    AND (claimable.rank, claimable.job_id) >= (-{first}.priority, {first}.id)
"""

# Postgres: pick the first claimable job exactly as Queue.claim does, then lock up to :k claimable jobs of its
# grid with its fuse key (itself included: it comes first in that order, and our own lock is no conflict; a
# NULL key gangs only itself), skipping rows other writers hold (claim_sql.pick: claimable and job rows), and
# move them from claimable to running (the trigger leaves claims to the statement, as claim_sql's). Two
# branches, not an OR, and the keyed one LATERAL: it then reads the gang index in order for the first job's
# values (an OR, or a plain join, made the generic plan filter every queued job: 31 ms per claim at 40,000).
# Each member's attempt id is made in the statement (uuid hex, as new_id() makes them in Python). One statement
# per filter set, as the single claim's (claim_sql.py).
@lru_cache(maxsize=256)
def _pg_claim(filters: ClaimFilters) -> str:
    return _pyformat(
        f"""
    WITH first AS ({pick(filters, True, columns=_FIRST_COLUMNS)}),
    keyed AS (
        SELECT same.id, same.rank FROM first, LATERAL (
            SELECT claimable.job_id AS id, claimable.rank  -- ix_claimable_gang: the key's jobs in claim order
            FROM claimable JOIN jobs AS job_row ON job_row.id = claimable.job_id
            WHERE {_SAME_KEY.format(first="first")} AND {claimable(filters, True)}
            ORDER BY claimable.rank, claimable.job_id
            LIMIT :k FOR UPDATE OF claimable, job_row SKIP LOCKED
        ) AS same
        WHERE first.fuse_key IS NOT NULL
    ),
    members AS (SELECT id, -priority AS rank FROM first WHERE fuse_key IS NULL UNION ALL SELECT id, rank FROM keyed),
    -- out of claimable by their keys (every (rank, id) pair of the two lists is a member's: an id has one rank)
    taken AS (
        DELETE FROM claimable WHERE rank = ANY(ARRAY(SELECT rank FROM members))
          AND job_id = ANY(ARRAY(SELECT id FROM members))
    ),
    claimed AS (
        UPDATE jobs SET state = 'running', attempt_id = replace(gen_random_uuid()::text, '-', ''),
            worker_id = :wid, lease_expires_at = :lease, attempts = attempts + 1,
            started_at = COALESCE(started_at, :now)
        FROM members WHERE jobs.id = members.id
        RETURNING jobs.attempt_id, jobs.id, jobs.grid_id, jobs.priority, jobs.trainer, jobs.config, jobs.seed,
            jobs.resources, jobs.code_rev, jobs.store, jobs.checkpoint, jobs.attempts
    ),
    lease AS (INSERT INTO running (worker_id, job_id) SELECT :wid, id FROM claimed),
    new_attempts AS (
        INSERT INTO attempts (id, job_id, worker_id, outcome, started_at, code_rev)
        SELECT attempt_id, id, :wid, 'running', :now, COALESCE(code_rev, :code_rev) FROM claimed
    ),
    worker AS ({WORKER_SEEN})
    SELECT attempt_id, {_COLUMNS} FROM claimed ORDER BY id
    """
    )


# SQLite: the same two picks, inside BEGIN IMMEDIATE (one writer at a time: nothing to skip), on the Queue's
# raw sqlite3 connection; INDEXED BY: without statistics SQLite could read claimable's key and filter.
@lru_cache(maxsize=256)
def _sqlite_members(filters: ClaimFilters) -> str:
    return f"""
    SELECT job_id AS id FROM claimable INDEXED BY ix_claimable_gang
    WHERE grid_id = :first_grid AND fuse_key = :first_key
      AND (rank, job_id) >= (-CAST(:first_priority AS INTEGER), CAST(:first_id AS INTEGER))
      AND {claimable(filters, False)}
    ORDER BY rank, job_id LIMIT :k
"""


_SQLITE_TAKE = f"""
    UPDATE jobs SET state = 'running', attempt_id = :aid, worker_id = :wid, lease_expires_at = :lease,
        attempts = attempts + 1, started_at = COALESCE(started_at, :now)
    WHERE id = :job_id
    RETURNING {_COLUMNS}
"""

# Postgres: every member's heartbeat in one statement. Members whose fence fails are simply not in `job`.
# SET LOCAL synchronous_commit off, as the single heartbeat (a lost heartbeat only shortens a lease).
_PG_HEARTBEAT = _pyformat(
    """
    WITH beat AS (
        SELECT * FROM json_to_recordset(:members)
            AS m(job_id integer, attempt_id text, step integer, progress_done double precision,
                 progress_total double precision, metrics json)
    ),
    job AS (
        UPDATE jobs SET lease_expires_at = :lease, step = COALESCE(beat.step, jobs.step),
            progress_done = COALESCE(beat.progress_done, jobs.progress_done),
            progress_total = COALESCE(beat.progress_total, jobs.progress_total)
        FROM beat
        WHERE jobs.id = beat.job_id AND jobs.attempt_id = beat.attempt_id AND jobs.worker_id = :wid
          AND jobs.state = 'running'
        RETURNING jobs.id, jobs.cancel_requested, beat.attempt_id, beat.metrics
    ),
    new_metrics AS (
        INSERT INTO metrics (job_id, attempt_id, step, "time", "values")
        SELECT job.id, job.attempt_id, m.step, m."time", m."values"
        FROM job, json_to_recordset(job.metrics) AS m(step integer, "time" double precision, "values" json)
    ),
    worker AS (""" + _GANG_WORKER_SEEN + """)
    SELECT id, cancel_requested, set_config('synchronous_commit', 'off', true) FROM job
    """
)
_SQLITE_HEARTBEAT = text(
    """
    UPDATE jobs SET lease_expires_at = :lease, step = COALESCE(:step, step),
        progress_done = COALESCE(:progress_done, progress_done),
        progress_total = COALESCE(:progress_total, progress_total)
    WHERE id = :job_id AND attempt_id = :attempt_id AND worker_id = :wid AND state = 'running'
    RETURNING cancel_requested
    """
)

# The job columns a finish may set (Queue._next_state); a member's `v` holds those it sets, the rest stay.
_FINISH_COLUMNS = {"state": "text", "result": "json", "finished_at": "double precision", "last_error": "text",
                   "errors": "integer", "preemptions": "integer", "not_before": "double precision"}
_RELEASED = ("attempt_id", "worker_id", "lease_expires_at")  # always NULL after a finish
_FINISH_SETS = ", ".join(
    [f"{name} = CASE WHEN done.v ? '{name}' THEN "
     + (f"(done.v->'{name}')::json" if kind == "json" else f"(done.v->>'{name}')::{kind}")
     + f" ELSE jobs.{name} END" for name, kind in _FINISH_COLUMNS.items()]
    + [f"{name} = NULL" for name in _RELEASED])
# Postgres: every member's finish in one statement: fence and set each member's values, end its attempt, add
# its event, and refresh the worker's last_seen_at (at most every WORKER_SEEN_SECONDS).
_PG_FINISH = _pyformat(
    """
    WITH done AS (
        SELECT * FROM json_to_recordset(:members)
            AS m(job_id integer, attempt_id text, outcome text, error text, message text, v jsonb)
    ),
    job AS (
        UPDATE jobs SET """ + _FINISH_SETS + """
        FROM done
        WHERE jobs.id = done.job_id AND jobs.attempt_id = done.attempt_id AND jobs.worker_id = :wid
          AND jobs.state = 'running'
        RETURNING jobs.id, jobs.state, done.attempt_id, done.outcome, done.error, done.message
    ),
    ended AS (
        UPDATE attempts SET outcome = job.outcome, ended_at = :now, error = job.error
        FROM job WHERE attempts.job_id = job.id AND attempts.id = job.attempt_id AND attempts.outcome = 'running'
    ),
    unrun AS (  -- out of running by their keys (queue.py's _PG_UNRUN: the trigger leaves successes to it)
        DELETE FROM running WHERE worker_id = :wid AND job_id = ANY(ARRAY(SELECT id FROM job))
    ),
    event AS (  -- not for the ends an attempt row says in full (ENDS_IN_ATTEMPT_ROW)
        INSERT INTO events (job_id, attempt_id, "time", kind, message)
        SELECT id, attempt_id, :now, outcome, message FROM job
        WHERE outcome NOT IN (""" + ", ".join(f"'{outcome}'" for outcome in ENDS_IN_ATTEMPT_ROW) + """)
    ),
    worker AS (""" + _GANG_WORKER_SEEN + """)
    SELECT id, state FROM job
    """
)
# Postgres, when some member ends as error or preempted: its next state depends on its counters, read (and
# locked) first, as the single finish does; the write is then the statement above.
_PG_FINISH_READ = _pyformat(
    """
    SELECT id, errors, max_attempts, preemptions, cancel_requested FROM jobs
    WHERE id = ANY(:ids) AND worker_id = :wid AND state = 'running'
    ORDER BY id FOR UPDATE
    """
)
_SQLITE_FINISH_READ = text(
    """
    SELECT id, attempt_id, errors, max_attempts, preemptions, cancel_requested FROM jobs
    WHERE id IN :ids AND worker_id = :wid AND state = 'running'
    """
).bindparams(bindparam("ids", expanding=True))
_PG_KNOWN = _pyformat("SELECT id FROM jobs WHERE id = ANY(:ids)")
_KNOWN = text("SELECT id FROM jobs WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))


@dataclass
class MemberBeat:
    job_id: int
    attempt_id: str
    step: int | None = None
    progress: tuple[float, float] | None = None
    metrics: list[Metric] = field(default_factory=list)


@dataclass
class MemberFinish:
    job_id: int
    attempt_id: str
    outcome: str
    result: dict[str, Any] | None = None
    error: str | None = None


class GangError(ValueError):
    """A gang request the queue cannot take as given; `field` names what is wrong (e.g. members.3.job_id)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---- claim -------------------------------------------------------------------------------------------
def claim_gang(queue: Queue, worker_id: str, max_jobs: int, trainers: Iterable[str] | None = None, gpus: float = 0.0,
               can_pin_code: bool = False, code_rev: str | None = None, grid_id: int | None = None,
               now: float | None = None) -> list[ClaimedJob]:
    """Take up to `max_jobs` runnable jobs of one grid sharing one fuse key, best first; [] when none.
    Expired leases are handled as Queue.claim handles them."""
    if isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1:
        raise GangError("max_jobs", f"must be an integer of at least 1; got {max_jobs!r}")
    scan = now is not None or time.monotonic() >= queue._next_expiry_scan
    now = time.time() if now is None else now
    lease = now + queue.policy.lease_seconds
    params = {"wid": worker_id, "lease": lease, "now": now, "k": max_jobs, "code_rev": code_rev}
    filters = ClaimFilters.of(trainers, gpus, can_pin_code, grid_id)
    claim_once = _claim_sqlite if queue._sqlite else _claim_postgres
    params["from_rank"], params["from_id"] = queue.claim_floor(filters, scan)
    rows = claim_once(queue, filters, params, scan)
    if not rows and not scan:  # from every job, after the expiry scan, as Queue.claim
        params["from_rank"], params["from_id"] = queue.claim_floor(filters, True)
        rows = claim_once(queue, filters, params, True)
    if rows:
        first = min(rows, key=lambda row: (-row["priority"], row["id"]))
        queue.claimed_at(filters, first["priority"], first["id"])
    return [
        ClaimedJob(id=row["id"], grid_id=row["grid_id"], attempt_id=row["attempt_id"], worker_id=worker_id,
                   trainer=row["trainer"], config=_json(row["config"]), seed=row["seed"],
                   resources=_json(row["resources"]), code_rev=row["code_rev"], store=row["store"],
                   checkpoint=_json(row["checkpoint"]), attempt=row["attempts"], lease_expires_at=lease,
                   prune_steps=queue.pruner.judge_steps(row["grid_id"], row["id"]))
        for row in rows
    ]


def _claim_postgres(queue: Queue, filters: ClaimFilters, params: dict[str, Any], scan: bool) -> list[dict[str, Any]]:
    if scan:
        with queue._tx() as conn:
            queue._scan_expired(conn, params["now"])
    with queue._autocommit.connection() as conn:
        return conn.execute(_pg_claim(filters), params).fetchall()


def _claim_sqlite(queue: Queue, filters: ClaimFilters, params: dict[str, Any], scan: bool) -> list[dict[str, Any]]:
    worker_id, now = params["wid"], params["now"]
    with queue._tx() as conn:
        if scan:
            queue._scan_expired(conn, now)
        first = conn.execute(pick(filters, False, columns=_FIRST_COLUMNS), params).fetchone()
        if first is None:
            queue._saw_worker(conn, worker_id, now)
            return []
        ids = [first["id"]]  # a NULL key gangs only itself; else the first job leads its key's members
        if first["fuse_key"] is not None:
            ids = [row["id"] for row in conn.execute(_sqlite_members(filters), {
                **params, "first_grid": first["grid_id"], "first_id": first["id"], "first_key": first["fuse_key"],
                "first_priority": first["priority"]}).fetchall()]
        rows = []
        for job_id in ids:
            attempt_id = new_id()
            row = dict(conn.execute(_SQLITE_TAKE, {**params, "aid": attempt_id, "job_id": job_id}).fetchone())
            row["attempt_id"] = attempt_id
            conn.execute(NEW_ATTEMPT, {"aid": attempt_id, "job_id": job_id, "wid": worker_id, "now": now,
                                       "code_rev": row["code_rev"] or params["code_rev"]})
            rows.append(row)
        queue._saw_worker(conn, worker_id, now)
    return rows


# ---- heartbeat ---------------------------------------------------------------------------------------
def heartbeat_gang(queue: Queue, worker_id: str, members: list[MemberBeat], now: float | None = None) -> list[Reply]:
    """Extend every member's lease and store its progress and metrics; one Reply per member, in order. A
    member whose attempt is no longer current (and cannot regain its job) gets ok=False, stop=True."""
    check_members(queue, members)
    now = time.time() if now is None else now
    replies = _with_regain(queue, worker_id, members, now, lambda batch: _heartbeat(queue, worker_id, batch, now))
    return [queue.prune_reply(m.job_id, m.metrics, reply, now) for m, reply in zip(members, replies)]  # early stopping


def _heartbeat(queue: Queue, worker_id: str, members: list[MemberBeat], now: float) -> dict[int, Reply]:
    lease = now + queue.policy.lease_seconds
    if not queue._sqlite:
        payload = [{"job_id": m.job_id, "attempt_id": m.attempt_id, "step": m.step,
                    "progress_done": m.progress[0] if m.progress else None,
                    "progress_total": m.progress[1] if m.progress else None,
                    "metrics": [{"step": x.step, "time": x.time, "values": x.values} for x in m.metrics]}
                   for m in members]
        with queue._autocommit.connection() as conn:
            rows = conn.execute(_PG_HEARTBEAT, {"members": Json(payload), "lease": lease, "now": now,
                                                "wid": worker_id}).fetchall()
        return {row["id"]: Reply(ok=True, cancel=bool(row["cancel_requested"]), lease_expires_at=lease) for row in rows}
    replies = {}
    with write_tx(queue.engine) as conn:
        for m in members:
            row = conn.execute(_SQLITE_HEARTBEAT, {
                "lease": lease, "step": m.step, "job_id": m.job_id, "attempt_id": m.attempt_id, "wid": worker_id,
                "progress_done": m.progress[0] if m.progress else None,
                "progress_total": m.progress[1] if m.progress else None}).first()
            if row is None:
                continue
            if m.metrics:
                conn.execute(t.metrics.insert(), [{"job_id": m.job_id, "attempt_id": m.attempt_id, "step": x.step,
                                                   "time": x.time, "values": x.values} for x in m.metrics])
            replies[m.job_id] = Reply(ok=True, cancel=bool(row.cancel_requested), lease_expires_at=lease)
        if replies:
            conn.execute(text(WORKER_SEEN), {"wid": worker_id, "now": now})
    return replies


# ---- finish ------------------------------------------------------------------------------------------
def finish_gang(queue: Queue, worker_id: str, members: list[MemberFinish], now: float | None = None) -> list[Reply]:
    """End every member's attempt with its own outcome (succeeded, error, preempted, cancelled), each by the
    single finish's rules; one Reply per member, in order (`state`: the job's new state)."""
    check_members(queue, members)
    for i, m in enumerate(members):
        if m.outcome not in OUTCOMES:
            raise GangError(f"members.{i}.outcome", f"must be one of {', '.join(OUTCOMES)}; got '{m.outcome}'")
    now = time.time() if now is None else now
    return _with_regain(queue, worker_id, members, now, lambda batch: _finish(queue, worker_id, batch, now))


def _finish(queue: Queue, worker_id: str, members: list[MemberFinish], now: float) -> dict[int, Reply]:
    if queue._sqlite:
        return _finish_sqlite(queue, worker_id, members, now)
    if all(m.outcome in _ROW_FREE_OUTCOMES for m in members):  # the common case: one statement
        with queue._autocommit.connection() as conn:
            rows = conn.execute(_PG_FINISH, _finish_params(queue, worker_id, members, {}, now)).fetchall()
        return {row["id"]: Reply(ok=True, state=row["state"]) for row in rows}
    with queue._autocommit.connection() as conn, conn.transaction():
        locked = {row["id"]: row for row in conn.execute(
            _PG_FINISH_READ, {"ids": [m.job_id for m in members], "wid": worker_id}).fetchall()}
        rows = conn.execute(_PG_FINISH, _finish_params(queue, worker_id, members, locked, now)).fetchall()
    return {row["id"]: Reply(ok=True, state=row["state"]) for row in rows}


def _finish_params(queue: Queue, worker_id: str, members: list[MemberFinish], locked: dict[int, Any],
                   now: float) -> dict[str, Any]:
    payload = []
    for m in members:
        if m.outcome not in _ROW_FREE_OUTCOMES and m.job_id not in locked:
            continue  # not held by this worker: the fence would refuse it anyway
        values = queue._next_state(_Row(locked.get(m.job_id)), m.outcome, m.result, m.error, now)
        payload.append({"job_id": m.job_id, "attempt_id": m.attempt_id, "outcome": m.outcome, "error": m.error,
                        "message": _finish_message(m.outcome, values, m.error),
                        "v": {k: v for k, v in values.items() if k not in _RELEASED}})
    return {"members": Json(payload), "wid": worker_id, "now": now}


class _Row:
    """A locked job row as Queue._next_state reads it (attributes); None for the row-free outcomes."""

    def __init__(self, row: dict[str, Any] | None):
        self.__dict__.update(row or {})


def _finish_sqlite(queue: Queue, worker_id: str, members: list[MemberFinish], now: float) -> dict[int, Reply]:
    replies = {}
    with write_tx(queue.engine) as conn:
        locked = {row["id"]: row for row in conn.execute(
            _SQLITE_FINISH_READ, {"ids": [m.job_id for m in members], "wid": worker_id}).mappings()}
        for m in members:
            row = locked.get(m.job_id)
            if row is None or row["attempt_id"] != m.attempt_id:
                continue
            values = queue._next_state(_Row(dict(row)), m.outcome, m.result, m.error, now)
            conn.execute(t.jobs.update().where(t.jobs.c.id == m.job_id), values)
            queue._end_attempt(conn, m.job_id, m.attempt_id, m.outcome, now, m.error)
            if m.outcome not in ENDS_IN_ATTEMPT_ROW:
                queue._event(conn, m.job_id, m.attempt_id, m.outcome, _finish_message(m.outcome, values, m.error),
                             now)
            replies[m.job_id] = Reply(ok=True, state=values["state"])
        if replies:
            conn.execute(text(WORKER_SEEN), {"wid": worker_id, "now": now})
    return replies


# ---- helpers -----------------------------------------------------------------------------------------
def check_members(queue: Queue, members: list[MemberBeat] | list[MemberFinish]) -> None:
    """Refuse the whole batch before writing anything when it is malformed or names a job that does not
    exist (a worker only ever sends jobs it claimed: that is a bug to name, not a stale member)."""
    if not members:
        raise GangError("members", "give at least one member")
    seen: set[int] = set()
    for i, m in enumerate(members):
        if m.job_id in seen:
            raise GangError(f"members.{i}.job_id", f"job {m.job_id} appears more than once in the batch")
        seen.add(m.job_id)
    if queue._sqlite:
        with queue.engine.connect() as conn:
            known = set(conn.execute(_KNOWN, {"ids": sorted(seen)}).scalars())
    else:
        with queue._autocommit.connection() as conn:
            known = {row["id"] for row in conn.execute(_PG_KNOWN, {"ids": sorted(seen)}).fetchall()}
    for i, m in enumerate(members):
        if m.job_id not in known:
            raise GangError(f"members.{i}.job_id", f"there is no job {m.job_id}")


def _with_regain(queue: Queue, worker_id: str, members, now: float, write) -> list[Reply]:
    """Run a batched fenced write; members whose fence found nothing try to regain their job (as the single
    path's Queue._or_regain does), and those that did are written once more."""
    replies = write(members)
    refused = [m for m in members if m.job_id not in replies]
    retry = [m for m in refused if queue.regain(m.job_id, m.attempt_id, now, worker_id=worker_id)]
    if retry:
        replies.update(write(retry))
    return [replies.get(m.job_id) or _stale(m.job_id, m.attempt_id, worker_id) for m in members]
