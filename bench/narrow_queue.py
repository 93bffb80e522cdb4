"""A prototype, not the product: the claim+finish cycle with claimable jobs and leases in narrow tables of
their own, so that no index of `jobs` holds a column the cycle writes and both job-row updates stay HOT
(bench/README.md, "A narrow queue table, prototyped"). `queue_interleaved.py --narrow` races it beside the
bare loop and gridfleet.

What it leaves out, and a real migration would have to carry: gang claims (a gang index on claimable),
retries, cancels and expiry scans putting jobs back (or taking them out), the worker row, and SQLite.
"""
from __future__ import annotations

import time
import uuid

# Run after the gridfleet migrations and the grid's submission, on a jobs table with fillfactor 50 (room on
# each page for a row's next versions, which HOT needs).
SETUP = [
    "DROP INDEX ix_jobs_claim", "DROP INDEX ix_jobs_gang", "DROP INDEX ix_jobs_running",
    """CREATE TABLE claimable (job_id integer PRIMARY KEY, rank integer NOT NULL, grid_id integer NOT NULL,
        trainer varchar(100) NOT NULL, gpus double precision NOT NULL, pinned boolean NOT NULL,
        not_before double precision NOT NULL)""",
    "CREATE INDEX ix_claimable ON claimable (rank, job_id)",
    """CREATE TABLE leases (job_id integer PRIMARY KEY, attempt_id varchar(32) NOT NULL,
        worker_id varchar(32) NOT NULL, expires_at double precision NOT NULL)""",
    """INSERT INTO claimable SELECT id, -priority, grid_id, trainer, gpus, code_rev IS NOT NULL, not_before
        FROM jobs WHERE state = 'queued'""",
    # not attempts and leases: analyzed empty, the generic plans would scan them sequentially for good
    "ANALYZE jobs", "ANALYZE claimable",
]
_CLAIM = """
taken AS (
    DELETE FROM claimable WHERE job_id = (
        SELECT job_id FROM claimable
        WHERE {after} (rank, job_id) >= (CAST(%(from_rank)s AS INTEGER), CAST(%(from_id)s AS INTEGER))
          AND not_before <= %(now)s AND gpus <= 0.0 AND trainer IN ('noop') AND NOT pinned
          AND grid_id IN (SELECT id FROM grids WHERE state = 'active')
        ORDER BY rank, job_id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING job_id
),
claimed AS (
    UPDATE jobs SET state = 'running', attempt_id = %(aid)s, worker_id = %(wid)s, lease_expires_at = %(lease)s,
        attempts = attempts + 1, started_at = COALESCE(started_at, %(now)s)
    WHERE id = (SELECT job_id FROM taken)
    RETURNING id, grid_id, priority, trainer, config, seed, resources, code_rev, store, checkpoint, attempts
),
lease AS (INSERT INTO leases SELECT id, %(aid)s, %(wid)s, %(lease)s FROM claimed),
new_attempt AS (
    INSERT INTO attempts (id, job_id, worker_id, outcome, started_at, code_rev)
    SELECT %(aid)s, id, %(wid)s, 'running', %(now)s, code_rev FROM claimed
)"""
FIRST_CLAIM = "WITH " + _CLAIM.format(after="") + "\nSELECT id, priority FROM claimed"
# the same finish as Queue._pg_finish_claim's (fenced on the job row), the lease deleted by its key
FINISH_AND_CLAIM = """
WITH job AS (
    UPDATE jobs SET state = 'succeeded', result = %(result)s, finished_at = %(now)s, attempt_id = NULL,
        worker_id = NULL, lease_expires_at = NULL
    WHERE id = %(b_job_id)s AND attempt_id = %(b_attempt_id)s AND worker_id = %(wid)s AND state = 'running'
    RETURNING id
),
unlease AS (DELETE FROM leases WHERE job_id = %(b_job_id)s AND EXISTS (SELECT 1 FROM job)),
ended AS (
    UPDATE attempts SET outcome = 'succeeded', ended_at = %(now)s
    FROM job WHERE attempts.job_id = %(b_job_id)s AND attempts.id = %(b_attempt_id)s AND attempts.outcome = 'running'
),""" + _CLAIM.format(after="EXISTS (SELECT 1 FROM job) AND job_id <> %(b_job_id)s AND") + """
SELECT claimed.id, claimed.grid_id, claimed.priority, claimed.trainer, claimed.config, claimed.seed,
       claimed.resources, claimed.code_rev, claimed.store, claimed.checkpoint, claimed.attempts
FROM job LEFT JOIN claimed ON true"""


def cycle_of(conn):
    """A worker's claim+finish cycle on `conn` (psycopg, autocommit, prepared statements): the first claim
    now, then each call finishes the job held and claims the next from its claim floor, as gridfleet's."""
    from psycopg.rows import tuple_row
    from psycopg.types.json import Json

    for setting in ("plan_cache_mode = force_generic_plan", "enable_sort = off", "jit = off"):
        conn.execute("SET " + setting)  # as the Queue's own connections
    cursor, worker_id, now, attempt_id = conn.cursor(row_factory=tuple_row), uuid.uuid4().hex, time.time(), uuid.uuid4().hex
    job_id, priority = cursor.execute(FIRST_CLAIM, {"aid": attempt_id, "wid": worker_id, "lease": now + 60,
                                                    "now": now, "from_rank": -(2**31), "from_id": 0}).fetchone()
    held = {"job": job_id, "aid": attempt_id, "floor": (-priority, job_id)}

    def cycle():
        now, attempt_id = time.time(), uuid.uuid4().hex
        row = cursor.execute(FINISH_AND_CLAIM, {
            "result": Json({"loss": 0.0}), "now": now, "b_job_id": held["job"], "b_attempt_id": held["aid"],
            "wid": worker_id, "from_rank": held["floor"][0], "from_id": held["floor"][1], "aid": attempt_id,
            "lease": now + 60}, prepare=True).fetchone()
        if row is None or row[0] is None:
            raise RuntimeError("the finish was refused or nothing was left to claim")
        held.update(job=row[0], aid=attempt_id, floor=(-row[2], row[0]))
    return cycle
