"""The job queue: register, claim, heartbeat, finish. Every write after a claim is fenced by attempt id
and by the worker holding the job: an attempt's writes come only from the registration that claimed it.

Postgres claims with one `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING`;
SQLite runs the same UPDATE inside `BEGIN IMMEDIATE` (one writer at a time, so nothing to skip).
The hot path (claim, heartbeat, finish, the expiry scan) runs on the Queue's own raw DB-API connections,
without SQLAlchemy's per-statement CPU (bench/README.md): on Postgres each of claim, heartbeat and the common
finishes is one statement (data-modifying CTEs) in autocommit mode, prepared by psycopg; on SQLite each is
one `BEGIN IMMEDIATE` transaction of statements that sqlite3 keeps prepared, and `finish_and_claim` (the
embedded agent's cycle) puts a finish and the next claim in one (docs/queue.md): one transaction on SQLite,
one statement on Postgres for the terminal outcomes.
A claim reads `claimable` (a trigger keeps queued jobs there; common/schema.py) from this Queue's claim floor
(docs/queue.md): the entries that claims leave behind in its key until a VACUUM are never read again, so a
claim costs the same after 100,000 jobs.
Expired leases are handled by the claim call itself: no janitor is needed for correctness.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

from psycopg.rows import dict_row
from psycopg.types.json import Json
from sqlalchemy import JSON, Connection, Engine, bindparam, delete, insert, select, text, update

from common import schema as t
from common.db import AutocommitConnections, SqliteConnections, is_sqlite, write_tx
from scheduler.claim_sql import (
    CLAIM_COLUMNS, CLAIM_FLOOR, WORKER_SEEN, WORKER_SEEN_OF, WORKER_SEEN_SECONDS, ClaimFilters, pg_claim, pg_claim_ctes,
    sqlite_claim,
)
from scheduler.claim_sql import pyformat as _pyformat
from scheduler.policy import JOB_STATES, RetryPolicy
from scheduler.pruning import Pruner

OUTCOMES = ("succeeded", "error", "preempted", "cancelled", "pruned")
_ROW_FREE_OUTCOMES = ("succeeded", "cancelled", "pruned")  # their next state does not depend on the job's counters
# An attempt that ends in one of these leaves its job in the same state, so its end event ("attempt ended:
# succeeded; job is now succeeded") says nothing its attempt row does not: no events row is written for it, and
# reports.job_events reads it from the attempt (attempt_end_event). The other ends are events rows as before.
ENDS_IN_ATTEMPT_ROW = _ROW_FREE_OUTCOMES
_NOW_COLUMNS = ("finished_at", "not_before")  # a finish often sets them to its own `now`
EXPIRED_BATCH = 50
EXPIRY_SCAN_SECONDS = 1.0  # a claim looks for expired leases at most this often per Queue (and when it finds nothing)
log = logging.getLogger("gridfleet.scheduler")
ANALYZE_AFTER_ROWS = 1000  # refresh the planner's statistics after adding at least this many jobs at once
# A heartbeat's or a finish's: only when its fenced job UPDATE (CTE `job`) held.
_FENCED_WORKER_SEEN = WORKER_SEEN_OF.format(worker="id = :b_worker_id AND EXISTS (SELECT 1 FROM job)")
_FENCED_WORKER_CTE = f",\n                worker AS ({_FENCED_WORKER_SEEN})"  # added to a finish when it is due
_JSON_JOB_COLUMNS = frozenset(c.name for c in t.jobs.columns if isinstance(c.type, JSON))  # sqlite3 takes text


# Hot-path statements, built once. Building a Core statement and its cache key costs about 70 us of CPU per
# call; these are executed with parameters instead (the SET clause comes from the parameter names).
# Bind names must differ from column names, hence the b_ prefix.
_UPDATE_WORKER = update(t.workers).where(t.workers.c.id == bindparam("b_worker_id"))
_INSERT_EVENT = insert(t.events)
_CURRENT_ATTEMPT = (t.jobs.c.id == bindparam("b_job_id"), t.jobs.c.attempt_id == bindparam("b_attempt_id"),
                    t.jobs.c.worker_id == bindparam("b_worker_id"), t.jobs.c.state == "running")  # the fence
_FINISH_READ = select(
    t.jobs.c.errors, t.jobs.c.max_attempts, t.jobs.c.preemptions, t.jobs.c.cancel_requested, t.jobs.c.worker_id,
).where(*_CURRENT_ATTEMPT)
# Postgres: the whole heartbeat as one statement (fenced lease/progress update, metrics, worker last seen).
# set_config(..., true) is SET LOCAL: this statement's transaction commits without waiting for the WAL
# flush. A heartbeat lost in a Postgres crash only shortens a lease; claims and finishes stay synchronous.
_PG_HEARTBEAT = _pyformat(
    f"""
    WITH job AS (
        UPDATE jobs SET lease_expires_at = :lease, step = COALESCE(:step, step),
            progress_done = COALESCE(:progress_done, progress_done),
            progress_total = COALESCE(:progress_total, progress_total)
        WHERE id = :b_job_id AND attempt_id = :b_attempt_id AND worker_id = :b_worker_id AND state = 'running'
        RETURNING cancel_requested, worker_id
    ),
    new_metrics AS (
        INSERT INTO metrics (job_id, attempt_id, step, "time", "values")
        SELECT :b_job_id, :b_attempt_id, m.step, m."time", m."values"
        FROM job, json_to_recordset(:metrics) AS m(step integer, "time" double precision, "values" json)
    ),
    worker AS ({_FENCED_WORKER_SEEN})
    SELECT cancel_requested, set_config('synchronous_commit', 'off', true) FROM job
    """
)

# Raw statements of the SQLite hot path and of the expiry scan (both databases; `:name` parameters, turned
# into psycopg's by Queue._sql). Each is a fixed string: sqlite3 and psycopg keep it prepared.
NEW_ATTEMPT = """
    INSERT INTO attempts (id, job_id, worker_id, outcome, started_at, code_rev)
    VALUES (:aid, :job_id, :wid, 'running', :now, :code_rev)
"""
_SQLITE_HEARTBEAT = """
    UPDATE jobs SET lease_expires_at = :lease, step = COALESCE(:step, step),
        progress_done = COALESCE(:progress_done, progress_done),
        progress_total = COALESCE(:progress_total, progress_total)
    WHERE id = :b_job_id AND attempt_id = :b_attempt_id AND worker_id = :b_worker_id AND state = 'running'
    RETURNING cancel_requested, worker_id
"""
NEW_METRIC = """
    INSERT INTO metrics (job_id, attempt_id, step, "time", "values") VALUES (:job_id, :attempt_id, :step, :time, :values)
"""
_SQLITE_FINISH_READ = """
    SELECT errors, max_attempts, preemptions, cancel_requested, worker_id FROM jobs
    WHERE id = :b_job_id AND attempt_id = :b_attempt_id AND worker_id = :b_worker_id AND state = 'running'
"""
END_ATTEMPT = """
    UPDATE attempts SET outcome = :outcome, ended_at = :now, error = :error
    WHERE job_id = :job_id AND id = :aid AND outcome = 'running'
"""
NEW_EVENT = """
    INSERT INTO events (job_id, attempt_id, "time", kind, message) VALUES (:job_id, :aid, :now, :kind, :message)
"""
# The finished job leaves `running` in the finish's own statement on Postgres (by its key: joined to `job`, the
# generic plan scanned the table); its trigger leaves a success to it (migration 0016). A finish that queues
# the job again also fires the trigger, whose delete then finds nothing and which adds the claimable row.
_PG_UNRUN = """
                unrun AS (
                    DELETE FROM running WHERE worker_id = :b_worker_id AND job_id = :b_job_id
                      AND EXISTS (SELECT 1 FROM job)
                )"""
_PG_FINISH_EVENT = """,
                event AS (
                    INSERT INTO events (job_id, attempt_id, "time", kind, message)
                    SELECT id, :b_attempt_id, :now, '{outcome}', :message FROM job
                )"""
# The running jobs (about one per worker) from `running` (common/schema.py), their leases from their rows: no
# lease in any index, so heartbeats stay HOT; the scan sorts the expired ones. Postgres locks the job rows, and
# reads them by key from the list of running ids: joined to `running`, the generic plan read all of `jobs`
# (statistics taken when nothing ran say few jobs run), 7% of a 16-worker cycle's backend CPU.
_EXPIRED = """
    SELECT jobs.id, jobs.attempt_id, jobs.losses, jobs.cancel_requested
    FROM {jobs}
    WHERE {listed}jobs.state = 'running' AND jobs.lease_expires_at < :now AND jobs.lease_expires_at >= :expired_since
    ORDER BY jobs.lease_expires_at LIMIT {batch}{lock}
"""
_SQLITE_EXPIRED = _EXPIRED.format(jobs="running JOIN jobs ON jobs.id = running.job_id", listed="",
                                  batch=EXPIRED_BATCH, lock="")
_PG_EXPIRED = _EXPIRED.format(jobs="jobs", listed="jobs.id = ANY(ARRAY(SELECT job_id FROM running)) AND ",
                              batch=EXPIRED_BATCH, lock=" FOR UPDATE OF jobs SKIP LOCKED")
_REQUEUE_LOST = """
    UPDATE jobs SET losses = :losses, attempt_id = NULL, worker_id = NULL, lease_expires_at = NULL, state = :state,
        finished_at = COALESCE(:finished_at, finished_at), last_error = COALESCE(:last_error, last_error),
        not_before = COALESCE(:not_before, not_before)
    WHERE id = :job_id AND attempt_id = :aid
"""
_END_LEASES_OF = """
    UPDATE jobs SET lease_expires_at = :ended
    WHERE state = 'running' AND id IN (SELECT job_id FROM running WHERE worker_id IN (
        SELECT id FROM workers WHERE last_seen_at < :silent_since))
"""


@dataclass
class ClaimedJob:
    id: int
    grid_id: int
    attempt_id: str
    worker_id: str  # the registration holding the job: every fenced write must name it
    trainer: str
    config: dict[str, Any]
    seed: int
    resources: dict[str, Any]
    code_rev: str | None
    store: str | None  # where new checkpoints go; None: the worker's default
    checkpoint: dict[str, Any] | None
    attempt: int  # 1 for the first attempt
    lease_expires_at: float
    prune_steps: list[int] = field(default_factory=list)  # where its worker waits for a verdict (pruning.py)


@dataclass
class Reply:
    """The answer to a fenced write. `stop` tells the worker to abandon the job now; `prune`: stop it as for a
    cancel, keep its checkpoint, and finish it as `pruned` (`reason` says which rule, at which step)."""

    ok: bool
    stop: bool = False
    cancel: bool = False
    prune: bool = False
    reason: str | None = None
    state: str | None = None
    lease_expires_at: float | None = None


@dataclass
class Metric:
    step: int
    values: dict[str, Any]
    time: float = field(default_factory=time.time)


def new_id() -> str:
    """32 hex digits: the time in microseconds, then 72 random bits. Ids made later sort later, so each insert
    into an index of them (the attempts' primary key) lands on its last page, which is in memory and already
    dirty, instead of on a random one (bench/README.md: 4-5 us of a 90 us SQLite cycle). The bits need to be
    unique, not secret (a fenced write must name the worker too, and workers authenticate): `random`, which
    reseeds itself in a forked child, instead of a getrandom() system call per id."""
    return f"{time.time_ns() // 1000:014x}{random.getrandbits(72):018x}"


def _stale(job_id: int, attempt_id: str, worker_id: str) -> Reply:
    return Reply(
        ok=False,
        stop=True,
        reason=f"attempt {attempt_id} is not the current attempt of job {job_id} held by worker {worker_id} "
        "(its lease expired and the job was re-claimed, the job was cancelled, or another worker holds it); "
        "stop working on it",
    )


class Queue:
    def __init__(self, engine: Engine, policy: RetryPolicy | None = None,
                 expiry_scan_seconds: float = EXPIRY_SCAN_SECONDS, expiry_grace_seconds: float = 0.0):
        """`expiry_grace_seconds`: for this long after the Queue is made, leases that expired before it was
        made are not requeued. The API passes one lease: workers that could not reach it while it was down
        get that long to heartbeat again before an idle worker's claim takes their jobs
        (docs/reliability.md). Leases that expire while it runs are requeued as usual."""
        self.engine = engine
        self.policy = policy or RetryPolicy()
        self.expiry_scan_seconds = expiry_scan_seconds
        self._sqlite = is_sqlite(engine)
        self._next_expiry_scan = 0.0  # time.monotonic() after which a claim scans for expired leases again
        self._started = time.time()
        self._grace_ends = self._started + expiry_grace_seconds if expiry_grace_seconds > 0 else None
        self.pruner = Pruner(engine)  # early stopping, asked after a heartbeat stored its metrics
        # Where this Queue's next claim starts its index scan, per set of claim filters: the (rank, id) of the
        # job it claimed last. Cleared by every expiry scan (at most expiry_scan_seconds apart), so a job that
        # became claimable before a floor (a retry, a new grid of higher priority) waits at most that long.
        self._claim_floors: dict[tuple, tuple[int, int]] = {}
        # The hot path runs on raw DB-API connections the Queue keeps: SQLAlchemy's checkout, execution
        # context and result set-up cost as much client CPU as the statement itself. Postgres: autocommit
        # (a one-statement write is its own transaction: no BEGIN and COMMIT round trips) and generic plans
        # (the prepared statements skip planning on every run; Postgres CPU per cycle 1.0-1.4 -> 0.5-1.1 ms in
        # a side-by-side bench run; their plans do not depend on the values). SQLite: sqlite3 connections,
        # each call one BEGIN IMMEDIATE transaction.
        # enable_sort off: the generic plan costs the claim floor's row comparison at a default 1/3 of the rows,
        # and below a few thousand queued jobs it then read them all and sorted them (a bitmap scan) instead
        # of reading claimable's key in order from the floor; statements that need a sort still sort.
        # jit off: every plan with a sort then costs over jit_above_cost, and JIT compiled a gang claim for
        # 0.37 s on every run (its statement took 0.4 s instead of 1 ms).
        self._autocommit = None if self._sqlite else AutocommitConnections(
            engine, row_factory=dict_row, options="-c plan_cache_mode=force_generic_plan -c enable_sort=off -c jit=off")
        self._raw_sqlite = SqliteConnections(engine) if self._sqlite else None
        self._finish_read = _FINISH_READ if self._sqlite else _FINISH_READ.with_for_update()
        self._finish_writes: dict[tuple[str, ...], str] = {}  # one statement per set of job columns
        self._statements: dict[str, str] = {}  # raw `:name` SQL -> this database's form
        self._seen_written: dict[str, float] = {}  # worker id -> the last_seen_at this Queue wrote last
        self._expired_sql = _SQLITE_EXPIRED if self._sqlite else _PG_EXPIRED

    def close(self) -> None:
        """Close the Queue's own raw connections (the engine's dispose() does it too)."""
        if self._autocommit is not None:
            self._autocommit.close()
        if self._raw_sqlite is not None:
            self._raw_sqlite.close()

    # ---- raw connections of the hot path -------------------------------------------------------
    def _tx(self):
        """A raw DB-API connection inside a write transaction (SQLite: BEGIN IMMEDIATE); rows by column name."""
        return self._raw_sqlite.transaction() if self._sqlite else self._pg_tx()

    @contextmanager
    def _pg_tx(self) -> Iterator[Any]:
        with self._autocommit.connection() as conn, conn.transaction():
            yield conn

    def _sql(self, statement: str) -> str:
        """A raw `:name` statement as this database's driver takes it (psycopg: `%(name)s`), made once."""
        if self._sqlite:
            return statement
        converted = self._statements.get(statement)
        if converted is None:
            converted = self._statements[statement] = _pyformat(statement)
        return converted

    def _saw_worker(self, conn: Any, worker_id: str | None, now: float) -> None:
        """Refresh the worker's last_seen_at, at most every WORKER_SEEN_SECONDS (raw connection). While the value
        this Queue wrote last is that fresh the statement would change nothing, so it is not run (5 us of a
        SQLite cycle). Should the caller's transaction roll back, the next refresh comes at most that late."""
        if worker_id and self._worker_seen_due(worker_id, now):
            if conn.execute(self._sql(WORKER_SEEN), {"wid": worker_id, "now": now}).rowcount:
                self._seen_written[worker_id] = now

    def _worker_seen_due(self, worker_id: str, now: float) -> bool:
        """Whether the worker's last_seen_at may be WORKER_SEEN_SECONDS old: this Queue has not written it since.
        (Another process's Queue may have: the statement itself skips a row that is fresh.) Postgres then adds
        the worker row's CTE to its statement, and otherwise leaves it out."""
        return now - self._seen_written.get(worker_id, -math.inf) >= WORKER_SEEN_SECONDS

    def claim_floor(self, filters: tuple, scan: bool) -> tuple[int, int]:
        """Where a claim with these filters starts its scan of claimable: CLAIM_FLOOR (every job) when it
        scans for expired leases, else the (rank, id) this Queue claimed last with them."""
        if scan:
            self._claim_floors.clear()
        return self._claim_floors.get(filters, CLAIM_FLOOR)

    def claimed_at(self, filters: tuple, priority: int, job_id: int) -> None:
        """Every claimable job before (rank, id) of the job just claimed was taken or is not claimable now."""
        self._claim_floors[filters] = (-priority, job_id)

    # ---- workers -------------------------------------------------------------------------------
    def register_worker(
        self,
        name: str,
        host: str,
        trainers: list[str],
        gpus: list[Any] | None = None,
        resources: dict[str, Any] | None = None,
        code_rev: str | None = None,
        worker_id: str | None = None,
        secret_hash: str | None = None,
    ) -> str:
        """A new worker row; returns its id. `secret_hash`: sha256 hex of the secret the API hands the
        worker (embedded mode has none: its one process is the only caller)."""
        now = time.time()
        worker_id = worker_id or new_id()
        with write_tx(self.engine) as conn:
            conn.execute(
                insert(t.workers).values(
                    id=worker_id, name=name, host=host, gpus=gpus or [], trainers=trainers,
                    resources=resources or {}, code_rev=code_rev, state="idle",
                    registered_at=now, last_seen_at=now, secret_hash=secret_hash,
                )
            )
        self._seen_written[worker_id] = now  # the claims of its first WORKER_SEEN_SECONDS need not refresh it
        return worker_id

    def worker_seen(self, worker_id: str, state: str | None = None) -> bool:
        """An idle worker's heartbeat. False when the worker id is unknown (it should register again)."""
        values = {"last_seen_at": time.time()}
        if state:
            values["state"] = state
        with write_tx(self.engine) as conn:
            found = conn.execute(
                update(t.workers).where(t.workers.c.id == worker_id).values(**values).returning(t.workers.c.id)
            ).first()
        return found is not None

    def touch_worker(self, conn: Connection, worker_id: str | None, now: float) -> None:
        if worker_id:
            conn.execute(_UPDATE_WORKER, {"b_worker_id": worker_id, "last_seen_at": now})

    # ---- claim ---------------------------------------------------------------------------------
    def claim(
        self,
        worker_id: str,
        trainers: Iterable[str] | None = None,
        gpus: float = 0.0,
        can_pin_code: bool = False,
        code_rev: str | None = None,
        grid_id: int | None = None,
        now: float | None = None,
    ) -> ClaimedJob | None:
        """Take the best runnable job for this worker, or None. Never blocks on other claimers.

        Expired leases are handled here too: at most every `expiry_scan_seconds`, always when `now` is given
        (tests move time that way), and before answering None (an expired job may be all that is left).
        """
        request = self._claim_request(worker_id, trainers, gpus, can_pin_code, code_rev, grid_id, now)
        return self._claimed(request, self._claim_from_floor(request, self._claim_sqlite if self._sqlite
                                                             else self._claim_postgres))

    def _claim_request(self, worker_id: str, trainers: Iterable[str] | None, gpus: float, can_pin_code: bool,
                       code_rev: str | None, grid_id: int | None, now: float | None) -> SimpleNamespace:
        """A claim's parameters, its filters (the key of its claim floor and of its statements, which hold them:
        scheduler/claim_sql.py) and whether it scans expired leases."""
        scan = now is not None or time.monotonic() >= self._next_expiry_scan
        now = time.time() if now is None else now
        params = {"aid": new_id(), "wid": worker_id, "lease": now + self.policy.lease_seconds, "now": now,
                  "code_rev": code_rev}
        return SimpleNamespace(params=params, filters=ClaimFilters.of(trainers, gpus, can_pin_code, grid_id), scan=scan)

    def _claim_from_floor(self, request: SimpleNamespace, claim_once: Callable[[SimpleNamespace, bool], Any]):
        """The claimed row, or None: from the claim floor, then from every job after the expiry scan, so
        None only when nothing is left."""
        params = request.params
        params["from_rank"], params["from_id"] = self.claim_floor(request.filters, request.scan)
        row = claim_once(request, request.scan)
        if row is None and not request.scan:
            params["from_rank"], params["from_id"] = self.claim_floor(request.filters, True)
            row = claim_once(request, True)
        return row

    def _claimed(self, request: SimpleNamespace, row) -> ClaimedJob | None:
        """The ClaimedJob of a committed claim's row, CLAIM_COLUMNS in their order (None: nothing claimed); moves
        the claim floor past it."""
        if row is None:
            return None
        job_id, grid_id, priority, trainer, config, seed, resources, code_rev, store, checkpoint, attempts = row
        self.claimed_at(request.filters, priority, job_id)
        params = request.params
        return ClaimedJob(
            id=job_id, grid_id=grid_id, attempt_id=params["aid"], worker_id=params["wid"], trainer=trainer,
            config=_json(config), seed=seed, resources=_json(resources), code_rev=code_rev, store=store,
            checkpoint=_json(checkpoint), attempt=attempts, lease_expires_at=params["lease"],
            prune_steps=self.pruner.judge_steps(grid_id, job_id),
        )

    def _claim_sqlite(self, request: SimpleNamespace, scan: bool):
        with self._tx() as conn:
            row = self._claim_sqlite_in(conn, request, scan)
            if row is None:
                self._saw_worker(conn, request.params["wid"], request.params["now"])
        return row

    def _claim_sqlite_in(self, conn: Any, request: SimpleNamespace, scan: bool):
        """One claim inside the caller's transaction: the job, its new attempt, the worker seen. Writes nothing
        when no job is claimable: the caller refreshes the worker's last_seen_at then."""
        params = request.params
        worker_id, now = params["wid"], params["now"]
        if scan:
            self._scan_expired(conn, now)
        row = conn.execute(sqlite_claim(request.filters), params).fetchone()
        if row is None:
            return None
        conn.execute(NEW_ATTEMPT, {"aid": params["aid"], "job_id": row["id"], "wid": worker_id, "now": now,
                                   "code_rev": row["code_rev"] or params["code_rev"]})
        self._saw_worker(conn, worker_id, now)
        return row

    def _claim_postgres(self, request: SimpleNamespace, scan: bool):
        params = request.params
        if scan:
            with self._tx() as conn:
                self._scan_expired(conn, params["now"])
        see_worker = self._worker_seen_due(params["wid"], params["now"])
        with self._autocommit.cursor() as cursor:
            row = cursor.execute(pg_claim(request.filters, see_worker), params).fetchone()
        if see_worker:
            self._seen_written[params["wid"]] = params["now"]
        return row

    def requeue_expired(self, now: float | None = None) -> int:
        """Handle expired leases now (the claim does this too). Returns how many were handled."""
        with self._tx() as conn:
            return self._requeue_expired(conn, time.time() if now is None else now)

    def expire_leases_of_dead_workers(self, silent_for: float, now: float | None = None) -> int:
        """End the leases of running jobs whose worker has not been heard from for `silent_for` seconds,
        then requeue them as lost. Embedded mode calls this at start: its previous run died."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute(self._sql(_END_LEASES_OF), {"ended": now - 1.0, "silent_since": now - silent_for})
            return self._requeue_expired(conn, now)

    def _scan_expired(self, conn: Any, now: float) -> int:
        self._next_expiry_scan = time.monotonic() + self.expiry_scan_seconds
        self._claim_floors.clear()
        return self._requeue_expired(conn, now)

    def _requeue_expired(self, conn: Any, now: float) -> int:
        """`conn`: a raw connection in a write transaction (Queue._tx)."""
        in_grace = self._grace_ends is not None and now < self._grace_ends
        expired_since = self._started if in_grace else 0.0  # in the grace after start: only leases ended since
        rows = conn.execute(self._sql(self._expired_sql), {"now": now, "expired_since": expired_since}).fetchall()
        for row in rows:
            losses = row["losses"] + 1
            message = f"lease expired (loss {losses} of at most {self.policy.max_lost})"
            values: dict[str, Any] = {"finished_at": None, "last_error": None, "not_before": None}
            if row["cancel_requested"]:
                values.update(state="cancelled", finished_at=now)
            elif losses >= self.policy.max_lost:  # the max_lost-th loss spends the budget
                values.update(state="failed", finished_at=now, last_error=message + "; giving up")
            else:
                values.update(state="queued", not_before=now + self.policy.backoff("lost", losses))
            conn.execute(self._sql(_REQUEUE_LOST), {"job_id": row["id"], "aid": row["attempt_id"], "losses": losses,
                                                    **values})
            conn.execute(self._sql(END_ATTEMPT), {"job_id": row["id"], "aid": row["attempt_id"], "outcome": "lost",
                                                  "now": now, "error": message})
            conn.execute(self._sql(NEW_EVENT), {"job_id": row["id"], "aid": row["attempt_id"], "now": now,
                                                "kind": "lost", "message": message})
        return len(rows)

    # ---- fenced writes from the current attempt --------------------------------------------------
    def heartbeat(
        self,
        job_id: int,
        attempt_id: str,
        step: int | None = None,
        progress: tuple[float, float] | None = None,
        metrics: list[Metric] | None = None,
        now: float | None = None,
        *,
        worker_id: str,
    ) -> Reply:
        """Extend the lease and store progress and metrics, if `attempt_id` of `worker_id` still owns the job
        (or regains it)."""
        now = time.time() if now is None else now
        reply = self._or_regain(lambda: self._heartbeat(job_id, attempt_id, worker_id, step, progress, metrics, now),
                                job_id, attempt_id, worker_id, now)
        return self.prune_reply(job_id, metrics, reply, now)

    def prune_reply(self, job_id: int, metrics: list[Metric] | None, reply: Reply, now: float) -> Reply:
        """`reply` with `prune` set when the grid's rule stops the job (scheduler/pruning.py), after the
        beat's own write: the decision reads the metrics it stored, in a transaction of its own."""
        if not (reply.ok and metrics):
            return reply
        try:
            reason = self.pruner.check(job_id, metrics, now)
        except Exception as exc:  # noqa: BLE001 - the beat is stored; a later beat (past the rung) decides
            log.warning("job %s: no prune decision this beat: %s", job_id, type(exc).__name__)
            return reply
        if reason is not None:
            reply.prune, reply.reason = True, reason
        return reply

    def _heartbeat(self, job_id: int, attempt_id: str, worker_id: str, step: int | None, progress: tuple[float, float] | None,
                   metrics: list[Metric] | None, now: float) -> Reply:
        lease = now + self.policy.lease_seconds
        values: dict[str, Any] = {"lease_expires_at": lease}
        if step is not None:
            values["step"] = step
        if progress is not None:
            values["progress_done"], values["progress_total"] = progress
        params = {"b_job_id": job_id, "b_attempt_id": attempt_id, "b_worker_id": worker_id, "lease": lease,
                  "step": step, "progress_done": values.get("progress_done"),
                  "progress_total": values.get("progress_total"), "now": now}
        if not self._sqlite:
            params["metrics"] = Json([{"step": m.step, "time": m.time, "values": m.values} for m in metrics or ()])
            with self._autocommit.cursor() as cursor:
                row = cursor.execute(_PG_HEARTBEAT, params).fetchone()
            if row is None:
                return _stale(job_id, attempt_id, worker_id)
            return Reply(ok=True, cancel=bool(row[0]), lease_expires_at=lease)  # cancel_requested
        with self._tx() as conn:
            row = conn.execute(_SQLITE_HEARTBEAT, params).fetchone()
            if row is None:
                return _stale(job_id, attempt_id, worker_id)
            if metrics:
                conn.executemany(NEW_METRIC, [{"job_id": job_id, "attempt_id": attempt_id, "step": m.step,
                                               "time": m.time, "values": json.dumps(m.values)} for m in metrics])
            self._saw_worker(conn, row["worker_id"], now)
        return Reply(ok=True, cancel=bool(row["cancel_requested"]), lease_expires_at=lease)

    def set_checkpoint(self, job_id: int, attempt_id: str, pointer: dict[str, Any], *, worker_id: str) -> Reply:
        """Record the last durable checkpoint (call only once the file it points to is durable).

        Accepted from the attempt that runs the job, and from the attempt that made it succeed: a Hub upload
        of the final checkpoint may land after the job finished, and no other attempt can follow that one.
        Either way only from `worker_id`, the worker that ran that attempt.
        """
        return self._or_regain(lambda: self._set_checkpoint(job_id, attempt_id, pointer, worker_id),
                               job_id, attempt_id, worker_id)

    def _set_checkpoint(self, job_id: int, attempt_id: str, pointer: dict[str, Any], worker_id: str) -> Reply:
        values = dict(checkpoint=pointer, step=pointer.get("step"))
        succeeded_by_this_attempt = select(t.attempts.c.id).where(
            t.attempts.c.id == attempt_id, t.attempts.c.job_id == job_id, t.attempts.c.worker_id == worker_id,
            t.attempts.c.outcome == "succeeded",
        ).exists()
        with write_tx(self.engine) as conn:
            row = conn.execute(
                update(t.jobs)
                .where(t.jobs.c.id == job_id, t.jobs.c.attempt_id == attempt_id, t.jobs.c.worker_id == worker_id,
                       t.jobs.c.state == "running")
                .values(**values)
                .returning(t.jobs.c.id)
            ).first()
            if row is None:
                row = conn.execute(
                    update(t.jobs)
                    .where(t.jobs.c.id == job_id, t.jobs.c.state == "succeeded", succeeded_by_this_attempt)
                    .values(checkpoint=pointer)  # `step` stays the last reported one
                    .returning(t.jobs.c.id)
                ).first()
        return Reply(ok=True) if row else _stale(job_id, attempt_id, worker_id)

    def add_events(self, job_id: int, attempt_id: str, events: list[tuple[str, str]], now: float | None = None, *,
                   worker_id: str) -> Reply:
        now = time.time() if now is None else now
        with write_tx(self.engine) as conn:
            if not self._owns(conn, job_id, attempt_id, worker_id):
                return _stale(job_id, attempt_id, worker_id)
            for kind, message in events:
                self._event(conn, job_id, attempt_id, kind, message, now)
        return Reply(ok=True)

    def finish(
        self,
        job_id: int,
        attempt_id: str,
        outcome: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        now: float | None = None,
        *,
        worker_id: str,
    ) -> Reply:
        """End the attempt of `worker_id`: succeeded, error (retry with backoff until the budget is spent),
        preempted (requeue at once, no error budget) or cancelled."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got '{outcome}'")
        now = time.time() if now is None else now
        return self._or_regain(lambda: self._finish(job_id, attempt_id, worker_id, outcome, result, error, now),
                               job_id, attempt_id, worker_id, now)

    def finish_and_claim(
        self,
        job_id: int,
        attempt_id: str,
        outcome: str,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        now: float | None = None,
        *,
        worker_id: str,
        trainers: Iterable[str] | None = None,
        gpus: float = 0.0,
        can_pin_code: bool = False,
        code_rev: str | None = None,
        grid_id: int | None = None,
    ) -> tuple[Reply, ClaimedJob | None]:
        """`finish`, then, only when the finish was accepted, `claim` for the same worker with these filters:
        the finish's reply and the next job (None: nothing claimable, or the finish was refused).

        SQLite: both in one BEGIN IMMEDIATE transaction, so a cycle commits once and writes the worker row
        once (busy with the next job, or idle). A refused (stale) finish claims nothing and changes nothing;
        a lost attempt is regained first, as `finish` does. Postgres: one statement (one round trip, one
        commit) for a terminal outcome (succeeded, cancelled, pruned) when no expiry scan is due
        (_finish_and_claim_postgres); else `finish` then `claim`, as before.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got '{outcome}'")
        request = self._claim_request(worker_id, trainers, gpus, can_pin_code, code_rev, grid_id, now)
        if not self._sqlite:
            return self._finish_and_claim_postgres(job_id, attempt_id, outcome, result, error, request)
        now = request.params["now"]

        def once() -> tuple[Reply, Any]:
            with self._tx() as conn:
                reply = self._finish_sqlite_in(conn, job_id, attempt_id, worker_id, outcome, result, error, now)
                if not reply.ok:
                    return reply, None
                row = self._claim_from_floor(request, lambda request, scan: self._claim_sqlite_in(conn, request, scan))
                if row is None:
                    self._saw_worker(conn, worker_id, now)
            return reply, row

        reply, row = once()
        if not reply.ok and self.regain(job_id, attempt_id, now, worker_id=worker_id):
            reply, row = once()
        return reply, self._claimed(request, row)

    def _finish_and_claim_postgres(self, job_id: int, attempt_id: str, outcome: str, result: dict[str, Any] | None,
                                   error: str | None, request: SimpleNamespace) -> tuple[Reply, ClaimedJob | None]:
        """One statement (_pg_finish_claim) for the finishes that are one statement themselves (_ROW_FREE_OUTCOMES)
        when no expiry scan is due; otherwise, and after it refused, `finish` (which regains a lost attempt)
        then `claim`. When it finds nothing from the claim floor, the claim runs again from every job after
        the expiry scan, as `claim` does, in a statement of its own."""
        worker_id, now = request.params["wid"], request.params["now"]
        if outcome in _ROW_FREE_OUTCOMES and not request.scan:
            values = self._next_state(None, outcome, result, error, now)
            params = request.params
            params["from_rank"], params["from_id"] = self.claim_floor(request.filters, False)
            row = self._pg_finish_claim(job_id, attempt_id, worker_id, outcome, values, error, now, request)
            if row is not None:
                reply = Reply(ok=True, state=values["state"])
                if row[0] is None:  # the finish held, nothing was claimed from the floor
                    params["from_rank"], params["from_id"] = self.claim_floor(request.filters, True)
                    row = self._claim_postgres(request, True)
                return reply, self._claimed(request, row)
        reply = self.finish(job_id, attempt_id, outcome, result, error, now, worker_id=worker_id)
        if not reply.ok:
            return reply, None
        return reply, self._claimed(request, self._claim_from_floor(request, self._claim_postgres))

    def _finish(self, job_id: int, attempt_id: str, worker_id: str, outcome: str, result: dict[str, Any] | None,
                error: str | None, now: float) -> Reply:
        if not self._sqlite and outcome in _ROW_FREE_OUTCOMES:
            values = self._next_state(None, outcome, result, error, now)
            see_worker = self._worker_seen_due(worker_id, now)
            statement, params = self._finish_postgres(job_id, attempt_id, worker_id, outcome, values, error, now,
                                                      see_worker)
            with self._autocommit.cursor() as cursor:
                if cursor.execute(statement, params).fetchone() is None:
                    return _stale(job_id, attempt_id, worker_id)
            if see_worker:
                self._seen_written[worker_id] = now
            return Reply(ok=True, state=values["state"])
        if self._sqlite:
            return self._finish_sqlite(job_id, attempt_id, worker_id, outcome, result, error, now)
        with write_tx(self.engine) as conn:
            job = conn.execute(self._finish_read,
                               {"b_job_id": job_id, "b_attempt_id": attempt_id, "b_worker_id": worker_id}).first()
            if job is None:
                return _stale(job_id, attempt_id, worker_id)
            values = self._next_state(job, outcome, result, error, now)
            # the row is locked and current: the statement will find it
            conn.exec_driver_sql(*self._finish_postgres(job_id, attempt_id, worker_id, outcome, values, error, now))
        return Reply(ok=True, state=values["state"])

    def _finish_sqlite(self, job_id: int, attempt_id: str, worker_id: str, outcome: str,
                       result: dict[str, Any] | None, error: str | None, now: float) -> Reply:
        with self._tx() as conn:
            reply = self._finish_sqlite_in(conn, job_id, attempt_id, worker_id, outcome, result, error, now)
            if reply.ok:
                self._saw_worker(conn, worker_id, now)  # the fence matched it: the job's worker
        return reply

    def _finish_sqlite_in(self, conn: Any, job_id: int, attempt_id: str, worker_id: str, outcome: str,
                          result: dict[str, Any] | None, error: str | None, now: float) -> Reply:
        """The fenced finish inside the caller's transaction, without the worker row (the caller writes it:
        idle, or busy with the next job). A stale attempt changes nothing."""
        fence = {"b_job_id": job_id, "b_attempt_id": attempt_id, "b_worker_id": worker_id}
        if outcome in _ROW_FREE_OUTCOMES:  # the fenced UPDATE is the read: one statement fewer
            values = self._next_state(None, outcome, result, error, now)
            statement, params = self.job_write(values, fenced=True)
            params.update(fence)
            if not conn.execute(statement, params).rowcount:
                return _stale(job_id, attempt_id, worker_id)
        else:
            job = conn.execute(_SQLITE_FINISH_READ, fence).fetchone()
            if job is None:
                return _stale(job_id, attempt_id, worker_id)
            values = self._next_state(SimpleNamespace(**dict(job)), outcome, result, error, now)
            statement, params = self.job_write(values)
            conn.execute(statement, {"b_job_id": job_id, **params})
        conn.execute(END_ATTEMPT, {"job_id": job_id, "aid": attempt_id, "outcome": outcome, "now": now, "error": error})
        if outcome not in ENDS_IN_ATTEMPT_ROW:
            conn.execute(NEW_EVENT, {"job_id": job_id, "aid": attempt_id, "now": now, "kind": outcome,
                                     "message": _finish_message(outcome, values, error)})
        return Reply(ok=True, state=values["state"])

    def job_write(self, values: dict[str, Any], fenced: bool = False) -> tuple[str, dict[str, Any]]:
        """SQLite: `UPDATE jobs SET <values> WHERE id = :b_job_id` (one fixed string per set of columns, so
        sqlite3 keeps it prepared) and its parameters, JSON columns encoded. `fenced`: only the current
        attempt's running job of that worker (rowcount 0: the fence refused; no RETURNING, whose row costs a
        fetch)."""
        keys = (*values, fenced)
        statement = self._finish_writes.get(keys)
        if statement is None:
            sets = ", ".join(f"{key} = :v_{key}" for key in values)
            where = ("id = :b_job_id AND attempt_id = :b_attempt_id AND worker_id = :b_worker_id AND state = 'running'"
                     if fenced else "id = :b_job_id")
            statement = self._finish_writes[keys] = f"UPDATE jobs SET {sets} WHERE {where}"
        return statement, {f"v_{key}": json.dumps(value) if key in _JSON_JOB_COLUMNS else value
                           for key, value in values.items()}

    def _finish_postgres(self, job_id: int, attempt_id: str, worker_id: str, outcome: str, values: dict[str, Any],
                         error: str | None, now: float, see_worker: bool = True) -> tuple[str, dict[str, Any]]:
        """The whole finish as one statement, for psycopg, and its parameters: fenced, set `values`, end the
        attempt, add the event, refresh the worker's last_seen_at (`see_worker`: Queue._worker_seen_due). It
        returns no row when the attempt is not the current one (then nothing changed).

        The fenced UPDATE is the lock: the other parts read its RETURNING row, so they run only when the fence
        held, and a concurrent write to the job (an expiry scan, a cancel) makes it wait and re-check the fence
        on the new row version. The outcome, the new state, NULLs and values equal to `now` are written into
        the statement (one per shape, a few in all), so a run binds 5 or 6 parameters instead of 13: psycopg
        dumps each one, and the server binds each one."""
        worker = _FENCED_WORKER_CTE if see_worker else ""
        return self._pg_finish_statement(("finish", see_worker), outcome, values, error, now, job_id, attempt_id,
                                         worker_id, lambda ctes: f"""
                WITH {ctes}{worker}
                SELECT 1 FROM job
                """)

    def _pg_finish_claim(self, job_id: int, attempt_id: str, worker_id: str, outcome: str, values: dict[str, Any],
                         error: str | None, now: float, request: SimpleNamespace):
        """finish_and_claim on Postgres as one statement (one round trip, one commit), run: `_finish_postgres`'s
        fenced finish and the claim of claim_sql.pg_claim from the claim floor in `request.params` (no expiry
        scan). The worker's last_seen_at is refreshed as a heartbeat refreshes it, never when the fence
        refused. Returns None when the fence refused (then nothing changed, nothing was claimed), else the
        claimed job's row or a row whose `id` is None.

        The claim runs only when the fence held (its pick reads the fenced UPDATE's RETURNING row) and never
        picks the job being finished (claim_sql.pg_claim_ctes after a finish)."""
        see_worker = self._worker_seen_due(worker_id, now)
        worker = _FENCED_WORKER_CTE if see_worker else ""
        statement, params = self._pg_finish_statement(
            ("finish_and_claim", request.filters, see_worker), outcome, values, error, now, job_id, attempt_id,
            worker_id, lambda ctes: f"""
                WITH {ctes},{pg_claim_ctes(request.filters, True)}{worker}
                SELECT {", ".join(f"claimed.{column}" for column in CLAIM_COLUMNS.split(", "))}
                FROM job LEFT JOIN claimed ON true
                """)
        with self._autocommit.cursor() as cursor:
            row = cursor.execute(statement, {**request.params, **params}).fetchone()
        if see_worker and row is not None:
            self._seen_written[worker_id] = now
        return row

    def _pg_finish_statement(self, kind: tuple, outcome: str, values: dict[str, Any], error: str | None, now: float,
                             job_id: int, attempt_id: str, worker_id: str,
                             around: Callable[[str], str]) -> tuple[str, dict[str, Any]]:
        """A Postgres statement holding the finish's CTEs (`job`: the fenced UPDATE, RETURNING id; `ended`;
        `event`, unless the attempt row is the event: ENDS_IN_ATTEMPT_ROW) wrapped by `around`, made once per
        `kind` and shape, and the finish's parameters."""
        sets = tuple((key, _finish_value(key, value, now)) for key, value in values.items())
        shape = ("postgres", *kind, outcome, error is None, sets)
        statement = self._finish_writes.get(shape)
        if statement is None:
            assignments = ", ".join(f"{key} = {sql}" for key, sql in sets)
            ended_error = "NULL" if error is None else ":error"
            statement = self._finish_writes[shape] = _pyformat(around(
                f"""job AS (
                    UPDATE jobs SET {assignments}
                    WHERE id = :b_job_id AND attempt_id = :b_attempt_id AND worker_id = :b_worker_id
                      AND state = 'running'
                    RETURNING id
                ),
                ended AS (
                    UPDATE attempts SET outcome = '{outcome}', ended_at = :now, error = {ended_error}
                    FROM job WHERE attempts.job_id = :b_job_id AND attempts.id = :b_attempt_id
                      AND attempts.outcome = 'running'
                ),{_PG_UNRUN}{"" if outcome in ENDS_IN_ATTEMPT_ROW else _PG_FINISH_EVENT.format(outcome=outcome)}"""
            ))
        params = {"b_job_id": job_id, "b_attempt_id": attempt_id, "b_worker_id": worker_id, "now": now}
        if outcome not in ENDS_IN_ATTEMPT_ROW:
            params["message"] = _finish_message(outcome, values, error)
        if error is not None:
            params["error"] = error
        for (key, sql), value in zip(sets, values.values()):
            if sql == f":v_{key}":
                params[f"v_{key}"] = Json(value) if isinstance(t.jobs.c[key].type, JSON) else value
        return statement, params

    def _next_state(self, job, outcome: str, result, error, now: float) -> dict[str, Any]:
        """The job's new column values. `job` (the locked row) is not read for _ROW_FREE_OUTCOMES."""
        released = dict(attempt_id=None, worker_id=None, lease_expires_at=None)
        if outcome == "succeeded":
            return dict(state="succeeded", result=result or {}, finished_at=now, **released)
        if outcome == "pruned":  # pruned_step and pruned_by were written when the scheduler decided
            return dict(state="pruned", finished_at=now, **released)
        if outcome == "cancelled" or job.cancel_requested:
            return dict(state="cancelled", finished_at=now, last_error=error, **released)
        if outcome == "preempted":
            preemptions = job.preemptions + 1
            if preemptions > self.policy.max_preemptions:
                return dict(state="failed", preemptions=preemptions, finished_at=now,
                            last_error=f"preempted {preemptions} times", **released)
            return dict(state="queued", preemptions=preemptions, not_before=now, **released)
        errors = job.errors + 1  # outcome == "error"
        if errors >= job.max_attempts:
            return dict(state="failed", errors=errors, finished_at=now, last_error=error, **released)
        return dict(state="queued", errors=errors, last_error=error,
                    not_before=now + self.policy.backoff("error", errors), **released)

    # ---- regain: a lost attempt takes its job back ---------------------------------------------
    def _or_regain(self, write: Callable[[], Reply], job_id: int, attempt_id: str, worker_id: str,
                   now: float | None = None) -> Reply:
        """Run a fenced write; only when its fence found nothing, try to regain the job and run it once more."""
        reply = write()
        if not reply.ok and self.regain(job_id, attempt_id, now, worker_id=worker_id):
            reply = write()
        return reply

    def regain(self, job_id: int, attempt_id: str, now: float | None = None, *, worker_id: str) -> bool:
        """Give the job back to `attempt_id` of `worker_id` if its lease expired and nobody has claimed the job
        since (another worker's refused write never regains a job for its owner).

        The fenced writes try this only when their fence found nothing, so the hot path is unchanged. The
        expiry scan of any claim requeues an expired job as `lost` even when no other worker wants it; a
        worker that was only cut off (an API outage) and kept training then continues where it is: the job
        runs again under the same attempt with a fresh lease, the loss is not counted, and an event says so.
        Regainable: the job is queued without an attempt, this attempt is its newest one and ended as lost,
        and the grid is not cancelled. The job row is locked (Postgres) or the database is (SQLite), so a
        claim and a regain of the same job never both win.
        """
        now = time.time() if now is None else now
        jobs, attempts, workers = t.jobs, t.attempts, t.workers
        other = attempts.alias("other")
        newer_attempt = select(other.c.id).where(
            other.c.job_id == jobs.c.id, other.c.id != attempts.c.id, other.c.started_at >= attempts.c.started_at
        ).exists()
        query = (
            select(attempts.c.worker_id, workers.c.last_seen_at)
            .select_from(jobs.join(attempts, attempts.c.job_id == jobs.c.id)
                         .outerjoin(workers, workers.c.id == attempts.c.worker_id))
            .where(jobs.c.id == job_id, jobs.c.state == "queued", jobs.c.attempt_id.is_(None), jobs.c.losses > 0,
                   attempts.c.id == attempt_id, attempts.c.worker_id == worker_id, attempts.c.outcome == "lost",
                   ~newer_attempt,
                   jobs.c.grid_id.in_(select(t.grids.c.id).where(t.grids.c.state != "cancelled")))
        )
        if not self._sqlite:
            query = query.with_for_update(of=jobs)
        with write_tx(self.engine) as conn:
            row = conn.execute(query).first()
            if row is None:
                return False
            regained = conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.state == "queued", jobs.c.attempt_id.is_(None))
                .values(state="running", attempt_id=attempt_id, worker_id=row.worker_id,
                        lease_expires_at=now + self.policy.lease_seconds, losses=jobs.c.losses - 1)
                .returning(jobs.c.priority)
            ).one()
            if not self._sqlite:  # a claim's move, which Postgres' trigger leaves to the claim (migration 0016)
                conn.execute(delete(t.claimable).where(t.claimable.c.rank == -regained.priority,
                                                       t.claimable.c.job_id == job_id))
                conn.execute(insert(t.running).values(worker_id=row.worker_id, job_id=job_id))
            conn.execute(update(attempts).where(attempts.c.job_id == job_id, attempts.c.id == attempt_id)
                         .values(outcome="running", ended_at=None, error=None))
            silent = "" if row.last_seen_at is None else f" after {max(0.0, now - row.last_seen_at):.0f} s"
            self._event(conn, job_id, attempt_id, "regained",
                        f"lease regained{silent} without heartbeats: nobody had claimed the job since its lease "
                        "expired, so the same attempt goes on and the loss is not counted", now)
            self.touch_worker(conn, row.worker_id, now)
        return True

    # ---- helpers -------------------------------------------------------------------------------
    def _owns(self, conn: Connection, job_id: int, attempt_id: str, worker_id: str) -> bool:
        return conn.execute(
            select(t.jobs.c.id).where(
                t.jobs.c.id == job_id, t.jobs.c.attempt_id == attempt_id, t.jobs.c.worker_id == worker_id,
                t.jobs.c.state == "running",
            )
        ).first() is not None

    @staticmethod
    def _end_attempt(conn: Connection, job_id: int, attempt_id: str, outcome: str, now: float,
                     error: str | None) -> None:
        conn.execute(text(END_ATTEMPT), {"job_id": job_id, "aid": attempt_id, "outcome": outcome, "now": now,
                                         "error": error})

    @staticmethod
    def _event(conn: Connection, job_id: int, attempt_id: str | None, kind: str, message: str, now: float) -> None:
        conn.execute(
            _INSERT_EVENT, {"job_id": job_id, "attempt_id": attempt_id, "time": now, "kind": kind, "message": message}
        )

    # ---- pinned code (worker/code_cache.py) ----------------------------------------------------
    def record_code_rev(self, job_id: int, attempt_id: str, sha: str, now: float | None = None, *,
                        worker_id: str) -> Reply:
        """Store the full sha the current attempt really runs (the claim stored the job's `code_rev` as
        written in the grid, which may be a tag or a short sha), with an event saying so. Fenced."""
        now = time.time() if now is None else now
        with write_tx(self.engine) as conn:
            if not self._owns(conn, job_id, attempt_id, worker_id):
                return _stale(job_id, attempt_id, worker_id)
            conn.execute(update(t.attempts).where(t.attempts.c.job_id == job_id, t.attempts.c.id == attempt_id)
                         .values(code_rev=sha))
            self._event(conn, job_id, attempt_id, "code_rev", f"running commit {sha}", now)
        return Reply(ok=True)

    def worker_event(self, worker_id: str, kind: str, message: str, resources: dict[str, Any] | None = None,
                     now: float | None = None) -> bool:
        """Record what happened to a worker outside any job; `resources`, when given, replaces what the
        worker registered (so GET /workers shows its current state). False when the worker is unknown."""
        now = time.time() if now is None else now
        values: dict[str, Any] = {"last_seen_at": now}
        if resources is not None:
            values["resources"] = resources
        with write_tx(self.engine) as conn:
            found = conn.execute(
                update(t.workers).where(t.workers.c.id == worker_id).values(**values).returning(t.workers.c.id)
            ).first()
            if found is None:
                return False
            conn.execute(insert(t.worker_events).values(worker_id=worker_id, time=now, kind=kind, message=message))
        return True


def refresh_planner_stats(engine: Engine) -> None:
    """ANALYZE the jobs and claimable tables (Postgres; a no-op on SQLite). Call after adding many jobs at once.

    Until autovacuum gets to a freshly filled table, the planner's estimates are stale and it picks a
    claim plan that reads and sorts every queued job of every active grid on each claim (11 ms per claim
    at 20,000 queued jobs, 35 ms at 60,000, by EXPLAIN ANALYZE; see bench/README.md) instead of reading
    the first entries of claimable's key (about 0.1 ms). SQLite's planner picks that key without statistics.
    Not `running`: analyzed while nearly empty, its generic plans would keep scanning it sequentially.
    """
    if is_sqlite(engine):
        return
    with engine.connect() as conn:
        conn.execute(text("ANALYZE jobs"))
        conn.execute(text("ANALYZE claimable"))
        conn.commit()


def _finish_value(key: str, value: Any, now: float) -> str:
    """How a finish writes a job column: a constant in the statement text (NULL, `now`, a job state), or
    `:v_<key>` bound per run. Only job states are written as text, and they are checked to be one."""
    if value is None:
        return "NULL"
    if key == "state":
        if value not in JOB_STATES:
            raise ValueError(f"not a job state: {value!r}")
        return f"'{value}'"
    if key in _NOW_COLUMNS and value == now:
        return ":now"
    return f":v_{key}"


def attempt_end_event(attempt: Any) -> dict[str, Any]:
    """The end event of an attempt that ended in ENDS_IN_ATTEMPT_ROW, from its row (id, job_id, outcome,
    ended_at, error), as the events row the finish once wrote; `id` None: it has no events row."""
    return {"id": None, "job_id": attempt.job_id, "attempt_id": attempt.id, "time": attempt.ended_at,
            "kind": attempt.outcome,
            "message": _finish_message(attempt.outcome, {"state": attempt.outcome}, attempt.error)}


def _finish_message(outcome: str, values: dict[str, Any], error: str | None) -> str:
    message = f"attempt ended: {outcome}; job is now {values['state']}"
    if values["state"] == "queued" and values.get("not_before"):
        message += f" (retry not before {time.strftime('%H:%M:%S', time.gmtime(values['not_before']))} UTC)"
    if error:
        message += f"\n{error}"
    return message


def _json(value: Any) -> Any:
    """JSON columns come back decoded from both drivers; raw text (older SQLite rows) is decoded here."""
    if isinstance(value, str):
        return json.loads(value)
    return value
