"""The claim's SQL, one statement per set of claim filters (ClaimFilters): the pick of the next job, the claim's
UPDATE, and on Postgres the CTEs that start its attempt and refresh the worker row.

A worker claims with the same filters every time, so they are written into its statements as constants and a
run binds only what changes from claim to claim (ids, times, the claim floor): psycopg dumps every bound
parameter and the server binds it, on every run (13 of the Postgres cycle's 17 parameters were the filters
and what follows from them; bench/README.md). The constants are numbers, booleans turned into conditions,
and trainer names quoted as SQL strings; a statement is made once per filter set (lru_cache).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Iterable, NamedTuple

# (rank, id) before every job: rank = -priority, and priorities are within +-1,000,000 (scheduler/spec.py).
CLAIM_FLOOR = (-2_000_000_000, 0)
WORKER_SEEN_SECONDS = 5.0  # a claim, finish or heartbeat refreshes workers.last_seen_at when older than this
# A claim, a finish and a heartbeat refresh the worker's last_seen_at at most every WORKER_SEEN_SECONDS: the
# row's only per-job write. GET /workers derives busy/idle and the current job from running jobs.
# `{worker}`: which row (a Postgres statement's CTE names it from its other parts); WORKER_SEEN stands alone.
WORKER_SEEN_OF = ("UPDATE workers SET last_seen_at = :now WHERE {worker} "
                  f"AND last_seen_at < CAST(:now AS double precision) - {WORKER_SEEN_SECONDS}")
WORKER_SEEN = WORKER_SEEN_OF.format(worker="id = :wid")
CLAIM_COLUMNS = "id, grid_id, priority, trainer, config, seed, resources, code_rev, store, checkpoint, attempts"


class ClaimFilters(NamedTuple):
    """Which jobs a claim may take: one of `trainers` (None: any), needing at most `gpus`, pinned to a commit
    only when `can_pin`, of grid `grid_id` only (None: any). The key of a claim floor and of the statements.
    A tuple, so a plain tuple of the same values finds the same floor."""

    trainers: tuple[str, ...] | None
    gpus: float
    can_pin: bool
    grid_id: int | None

    @classmethod
    def of(cls, trainers: Iterable[str] | None, gpus: float, can_pin_code: bool, grid_id: int | None) -> ClaimFilters:
        """Checked and normalized, made once per distinct argument set (a worker claims with the same ones
        every time: 2-3 us of each cycle otherwise)."""
        given = None if trainers is None else tuple(trainers)
        try:
            return _filters_of(given, gpus, can_pin_code, grid_id)
        except TypeError:  # unhashable arguments are no names or numbers: _checked says what is wrong
            return cls._checked(given, gpus, can_pin_code, grid_id)

    @classmethod
    def _checked(cls, trainers: tuple | None, gpus: float, can_pin_code: bool, grid_id: int | None) -> ClaimFilters:
        names = None if trainers is None else tuple(sorted(set(trainers)))
        for name in names or ():
            if not isinstance(name, str) or "\x00" in name:
                raise ValueError(f"a trainer name must be text without NUL characters; got {name!r}")
        gpus = float(gpus)
        if not math.isfinite(gpus):
            raise ValueError(f"gpus must be a finite number; got {gpus!r}")
        return cls(names, gpus, bool(can_pin_code), None if grid_id is None else int(grid_id))

    def where(self) -> str:
        """The filters as one SQL condition on `claimable`, the same text on both databases."""
        parts = [f"claimable.gpus <= {self.gpus!r}"]
        if self.trainers is not None:  # an empty list matches no job
            parts.append(f"claimable.trainer IN ({', '.join(map(sql_string, self.trainers))})" if self.trainers
                         else "1 = 0")
        if not self.can_pin:
            parts.append("claimable.code_rev IS NULL")
        if self.grid_id is not None:
            parts.append(f"claimable.grid_id = {self.grid_id:d}")
        return " AND ".join(parts)


@lru_cache(maxsize=1024)
def _filters_of(trainers: tuple | None, gpus: float, can_pin_code: bool, grid_id: int | None) -> ClaimFilters:
    return ClaimFilters._checked(trainers, gpus, can_pin_code, grid_id)


def sql_string(value: str) -> str:
    """`value` as an SQL string constant (standard quoting: Postgres' standard_conforming_strings, SQLite)."""
    return "'" + value.replace("'", "''") + "'"


def pyformat(sql: str) -> str:
    """SQLAlchemy text()'s `:name` parameters as psycopg's `%(name)s` (`::type` casts stay as they are)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql.replace("%", "%%"))


# The claim's pick, from `claimable` (common/schema.py: a trigger keeps a queued job there) in its key's order:
# (rank, job_id). It starts at the claim floor by a row comparison: claimed jobs stay in the key as dead
# entries until a VACUUM, and walking them from the start made each claim read 3 -> 22 -> 80 index pages after
# 0 / 5,000 / 20,000 claims (issue 15).
# Postgres locks both the claimable row and the job's row (FOR UPDATE OF claimable, job_row SKIP LOCKED), and
# takes a job that neither another claimer nor any other writer holds: a cancel or a retry updates the job row
# first and then (its trigger) the claimable row, so a claim that waited for neither can never be part of a
# deadlock with one. The job's own state and backoff are checked on the locked row: when another claimer took
# the job after this statement's snapshot, Postgres rechecks them on the row's new version and skips it.
# `{after}`: finish_and_claim's extra condition on Postgres (pg_claim_ctes).
_PICK = """
    SELECT {columns} FROM claimable{join}
    WHERE {after}(claimable.rank, claimable.job_id) >= (CAST(:from_rank AS INTEGER), CAST(:from_id AS INTEGER))
      AND {claimable}
      AND {active_grid}
    ORDER BY claimable.rank, claimable.job_id
    LIMIT 1{lock}
"""
_JOB_OF_CLAIMABLE = " JOIN jobs AS job_row ON job_row.id = claimable.job_id"
_JOB_IS_QUEUED = " AND job_row.state = 'queued' AND job_row.not_before <= :now"
_LOCK_JOB = " FOR UPDATE OF claimable, job_row SKIP LOCKED"
_ACTIVE_GRID_IN = "claimable.grid_id IN (SELECT id FROM grids WHERE state = 'active')"
# SQLite builds the list of an `IN (SELECT ...)` by reading every grid on each claim (EXPLAIN QUERY PLAN: "LIST
# SUBQUERY ... SCAN grids"): 54-61 us per claim with 500 grids, against 10-14 us for a lookup of the job's grid.
# The lookup reads the covering ix_grids_state: the grid's row would make SQLite walk the overflow pages of its
# spec to reach `state` (9-12 us a claim for a grid of 100,000 jobs; migration 0015).
_SQLITE_ACTIVE_GRID = ("EXISTS (SELECT 1 FROM grids INDEXED BY ix_grids_state "
                       "WHERE grids.id = claimable.grid_id AND grids.state = 'active')")
_CLAIM_UPDATE = f"""
    UPDATE jobs SET state = 'running', attempt_id = :aid, worker_id = :wid,
        lease_expires_at = :lease, attempts = attempts + 1,
        started_at = COALESCE(started_at, :now)
    WHERE id = ({{pick}})
    RETURNING {CLAIM_COLUMNS}
"""
# Postgres moves the claimed job from `claimable` to `running` in the claim's own statement: its trigger leaves
# a claim to it (migration 0016: a plpgsql call cost 28 us of a 120 us claim). SQLite's trigger does it.
_PG_TAKE = """
    taken AS (
        DELETE FROM claimable WHERE (rank, job_id) = ({pick})
        RETURNING job_id
    ),
    claimed AS ({claim}),
    lease AS (INSERT INTO running (worker_id, job_id) SELECT :wid, id FROM claimed)"""
# finish_and_claim's claim: only when the finish's fence held (its `job` CTE returned the row: a one-time
# filter, so a refused finish locks and scans nothing), and never the job being finished. Only terminal
# outcomes take that path, so the job is `running` in the statement's snapshot and the pick could not see
# it anyway; the id test keeps the one statement from ever updating that row twice.
_AFTER_FINISH = "EXISTS (SELECT 1 FROM job) AND claimable.job_id <> :b_job_id AND "


@lru_cache(maxsize=256)
def pick(filters: ClaimFilters, postgres: bool, after_finish: bool = False, columns: str = "claimable.job_id") -> str:
    """The pick of one claimable job, its `columns` of `claimable` (`:name` parameters: from_rank, from_id,
    now; b_job_id after a finish); a gang claim's first job too (scheduler/gang.py). Postgres locks the
    claimable row and the job's row. SQLite looks up the job's grid instead of an IN list; its planner
    reads claimable's key in order (the gang index holds only keyed jobs, so no other index fits)."""
    return _PICK.format(columns=columns, join=_JOB_OF_CLAIMABLE if postgres else "",
                        after=_AFTER_FINISH if after_finish else "", claimable=claimable(filters, postgres),
                        active_grid=_ACTIVE_GRID_IN if postgres else _SQLITE_ACTIVE_GRID,
                        lock=_LOCK_JOB if postgres else "")


def claimable(filters: ClaimFilters, postgres: bool) -> str:
    """The condition a row of `claimable` meets when a claim with these filters may take its job, without the
    claim floor and the grid's state (a gang's members too). Postgres: on the job's locked row (`job_row`),
    the job is still queued and out of its backoff."""
    return (f"claimable.not_before <= :now AND {ClaimFilters(*filters).where()}"
            + (_JOB_IS_QUEUED if postgres else ""))


@lru_cache(maxsize=256)
def sqlite_claim(filters: ClaimFilters) -> str:
    """SQLite: claim the job (`:name` parameters aid, wid, lease, now, from_rank, from_id); its attempt is
    NEW_ATTEMPT, in the same transaction."""
    return _CLAIM_UPDATE.format(pick=pick(filters, False))


@lru_cache(maxsize=256)
def pg_claim_ctes(filters: ClaimFilters, after_finish: bool = False) -> str:
    """Postgres: the claim's data-modifying CTEs (`:name` text): `taken` (its claimable row), `claimed` (the
    job), `lease` (its running row) and `new_attempt`."""
    return f"""
{_PG_TAKE.format(pick=pick(filters, True, after_finish, "claimable.rank, claimable.job_id"),
                claim=_CLAIM_UPDATE.format(pick="SELECT job_id FROM taken"))},
    new_attempt AS (
        INSERT INTO attempts (id, job_id, worker_id, outcome, started_at, code_rev)
        SELECT :aid, id, :wid, 'running', :now, COALESCE(code_rev, :code_rev) FROM claimed
    )"""


@lru_cache(maxsize=256)
def pg_claim(filters: ClaimFilters, see_worker: bool) -> str:
    """Postgres, for psycopg: one statement, one round trip: claim the job, start its attempt, and (when
    `see_worker`: the Queue has not refreshed it for WORKER_SEEN_SECONDS) refresh the worker's last_seen_at.
    Data-modifying CTEs all run, each sees `claimed`."""
    worker = f",\n    worker AS ({WORKER_SEEN})" if see_worker else ""
    return pyformat(f"WITH {pg_claim_ctes(filters)}{worker}\n    SELECT {CLAIM_COLUMNS} FROM claimed")
