"""The queue at grid scale (issue 15): a claim reads the same few index pages however many jobs finished
before it (no VACUUM: the test server's autovacuum is off), the claim floor never hides a job, and
the queue's migrations go down and up again on both databases."""
from __future__ import annotations

import re
import time
from typing import Any, Callable

import pytest
from alembic import command
from sqlalchemy import Engine, inspect, text

from common.db import alembic_config, make_engine
from scheduler.gang import claim_gang
from scheduler.grids import submit_grid
from scheduler.claim_sql import CLAIM_FLOOR, ClaimFilters, pick, pyformat, sql_string, sqlite_claim
from scheduler.queue import Queue
from scheduler.spec import GridSpec
from worker.trainers import validate_config

FILTERS = (("noop",), 0.0, False, None)  # Queue.claim's filter key for claim(worker, trainers=["noop"])


def submit(engine, name: str, jobs: int, priority: int = 0) -> int:
    spec = GridSpec.model_validate({"name": name, "trainer": "noop", "priority": priority,
                                    "axes": {"value": [float(i) for i in range(jobs)]}})
    return submit_grid(engine, spec, validate_config).grid_id


def cycles(queue: Queue, worker: str, n: int) -> None:
    for _ in range(n):
        job = queue.claim(worker, trainers=["noop"])
        assert queue.finish(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=worker).ok


def pick_buffers(queue: Queue, floor: tuple[int, int]) -> int:
    """Postgres: pages the claim's pick reads from `floor` (EXPLAIN ANALYZE BUFFERS, rolled back)."""
    statement = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + pyformat(pick(FILTERS, True))
    params = {"now": time.time(), "from_rank": floor[0], "from_id": floor[1]}
    with queue._autocommit.connection() as conn, conn.transaction(force_rollback=True):
        plan = next(iter(conn.execute(statement, params).fetchone().values()))[0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


def generic_pick_plan(queue: Queue) -> str:
    """Postgres: the plan the Queue's connections use for the claim's pick (generic: plan_cache_mode)."""
    names = ["now", "from_rank", "from_id"]
    statement = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", pyformat(pick(FILTERS, True)))
    with queue._autocommit.connection() as conn:
        conn.execute("PREPARE pick (float8, int, int) AS " + statement)
        try:
            rows = conn.execute("EXPLAIN (COSTS OFF) EXECUTE pick (1e10, 0, 1)")
            return "\n".join(next(iter(row.values())) for row in rows.fetchall())
        finally:
            conn.execute("DEALLOCATE pick")


def test_a_claim_reads_as_much_after_1500_finished_jobs_as_after_200(engine):
    submit(engine, "big", 1_600)
    queue = Queue(engine, expiry_scan_seconds=3600.0)  # no scan clears the floor during the test
    worker = queue.register_worker("w", "host", ["noop"])
    if engine.dialect.name == "sqlite":
        # SQLite deletes index entries in place; what matters is the plan: claimable's key in order, no sort.
        with queue._raw_sqlite.transaction() as conn:
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sqlite_claim(FILTERS), {
                "aid": "a", "wid": worker, "lease": 0.0, "now": time.time(),
                "from_rank": CLAIM_FLOOR[0], "from_id": CLAIM_FLOOR[1]}))
        assert "SEARCH claimable USING PRIMARY KEY" in plan and "TEMP B-TREE" not in plan, plan
        cycles(queue, worker, 200)
        assert queue._claim_floors[FILTERS][1] == 200  # the floor follows the claims (job ids 1..1600)
        return
    plan = generic_pick_plan(queue)
    assert "Index Scan using claimable_pkey" in plan and "ROW(rank, job_id) >= ROW($2, $3)" in plan, plan
    cycles(queue, worker, 200)
    early = pick_buffers(queue, queue._claim_floors[FILTERS])
    cycles(queue, worker, 1_300)
    floor = queue._claim_floors[FILTERS]
    late = pick_buffers(queue, floor)
    from_start = pick_buffers(queue, CLAIM_FLOOR)  # what the first claim after an expiry scan reads
    assert late <= early + 1 and late <= 10, (early, late)  # claimable (3), the grid (2), the job (3), locks
    assert from_start > late, "walking the 1,500 dead entries from the start should read more pages than the floor"


def test_the_claim_floor_never_hides_a_job(engine):
    """Between expiry scans a claim starts at its floor; a job before it is still claimed once nothing after
    it is left, and every scan starts from the first job again (priority order)."""
    first = submit(engine, "low", 3)
    queue = Queue(engine, expiry_scan_seconds=3600.0)
    worker = queue.register_worker("w", "host", ["noop"])
    a = queue.claim(worker, trainers=["noop"])
    b = queue.claim(worker, trainers=["noop"])  # the floor is now at b
    assert queue.finish(a.id, a.attempt_id, "error", error="try again", worker_id=worker).ok  # queued again, backoff
    assert queue.finish(b.id, b.attempt_id, "succeeded", worker_id=worker).ok
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET not_before = 0 WHERE id = :id"), {"id": a.id})  # runnable at once
    taken = []
    while (job := queue.claim(worker, trainers=["noop"])) is not None:
        taken.append(job.id)
        assert queue.finish(job.id, job.attempt_id, "succeeded", worker_id=worker).ok
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM jobs WHERE grid_id = :g ORDER BY id"), {"g": first}).scalars().all()
    assert taken == [ids[2], a.id]  # the third job from the floor, then the requeued one, before answering None
    with engine.connect() as conn:
        states = conn.execute(text("SELECT DISTINCT state FROM jobs WHERE grid_id = :g"), {"g": first}).scalars().all()
    assert states == ["succeeded"]

    low = submit(engine, "low-2", 2)
    scanning = Queue(engine, expiry_scan_seconds=0.0)  # every claim scans: the floor is cleared each time
    w2 = scanning.register_worker("w2", "host", ["noop"])
    b = scanning.claim(w2, trainers=["noop"])
    high = submit(engine, "high", 1, priority=5)
    c = scanning.claim(w2, trainers=["noop"])
    assert (b.grid_id, c.grid_id) == (low, high)


def test_migration_0009_goes_down_and_up_with_the_jobs_kept(db_url):
    engine = make_engine(db_url)
    try:
        grid = submit(engine, "kept", 3)
        command.downgrade(alembic_config(db_url), "0006")
        names = {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
        assert "ix_jobs_lease" in names and "ix_jobs_running" not in names
        command.upgrade(alembic_config(db_url), "0015")  # its indexes lived until 0016 made them tables
        inspector = inspect(engine)
        names = {ix["name"] for ix in inspector.get_indexes("jobs")}
        assert "ix_jobs_running" in names and "ix_jobs_lease" not in names
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                options = conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'jobs'")).scalar()
                assert "fillfactor=70" in options
                definition = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_claim'"))
            else:
                definition = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_claim'"))
            assert "'queued'" in definition.scalar()  # the claimable state is listed: no other state is in it
        command.upgrade(alembic_config(db_url), "head")
        queue = Queue(engine)
        worker = queue.register_worker("w", "host", ["noop"])
        claimed = [queue.claim(worker, trainers=["noop"]) for _ in range(4)]
        assert sorted(j.grid_id for j in claimed if j) == [grid] * 3 and claimed[-1] is None
    finally:
        engine.dispose()


def test_claims_finishes_and_heartbeats_refresh_the_workers_last_seen_at_most_every_5_seconds(engine):
    """Per cycle only what users read is written every time (the job, attempts, events, metrics); the
    worker row's last-seen time is refreshed only once it is WORKER_SEEN_SECONDS old, and nothing else of the
    row is written (GET /workers derives busy/idle from the jobs)."""
    from scheduler import reports
    from scheduler.claim_sql import WORKER_SEEN_SECONDS

    submit(engine, "g", 2)
    queue = Queue(engine)
    worker = queue.register_worker("w", "host", ["noop"])
    t0 = time.time() + 100.0  # later than the registration by more than WORKER_SEEN_SECONDS

    def seen() -> tuple[float, str]:
        [row] = [w for w in reports.list_workers(engine) if w["id"] == worker]
        return row["last_seen_at"], row["state"]

    job = queue.claim(worker, trainers=["noop"], now=t0)
    assert seen() == (t0, "busy")
    assert queue.heartbeat(job.id, job.attempt_id, step=1, now=t0 + 1, worker_id=worker).ok
    assert seen() == (t0, "busy")  # 1 s after the claim wrote it: not written again
    assert queue.heartbeat(job.id, job.attempt_id, step=2, now=t0 + WORKER_SEEN_SECONDS + 1, worker_id=worker).ok
    assert seen() == (t0 + WORKER_SEEN_SECONDS + 1, "busy")
    reply, job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", now=t0 + WORKER_SEEN_SECONDS + 2,
                                        worker_id=worker, trainers=["noop"])
    assert reply.ok and job is not None and seen() == (t0 + WORKER_SEEN_SECONDS + 1, "busy")
    assert queue.finish(job.id, job.attempt_id, "succeeded", now=t0 + 2 * WORKER_SEEN_SECONDS + 2, worker_id=worker).ok
    assert seen() == (t0 + 2 * WORKER_SEEN_SECONDS + 2, "idle")


def _down_and_up(db_url: str, before: str, done: Callable[[Any], bool], after: str = "0015") -> Engine:
    """Check `done(conn)` holds at `after` (the last revision with the index it checks: 0016 made the queue's
    indexes tables), not after downgrading to `before`, and again after upgrading back, with the three jobs
    submitted first kept at head. Returns the engine (the caller disposes of it)."""
    engine = make_engine(db_url)
    submit(engine, "kept", 3)
    command.downgrade(alembic_config(db_url), after)
    with engine.connect() as conn:
        assert done(conn)
    command.downgrade(alembic_config(db_url), before)
    with engine.connect() as conn:
        assert not done(conn)
    command.upgrade(alembic_config(db_url), after)
    with engine.connect() as conn:
        assert done(conn)
    command.upgrade(alembic_config(db_url), "head")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 3
    return engine


def test_migration_0011_turns_deduplication_off_for_ix_jobs_running_and_back(db_url):
    """Postgres merged a worker's running job and its finished jobs' dead entries into one posting list that
    never died: the expiry scan read 377 pages after 20,000 jobs of four workers instead of 28."""
    if db_url.startswith("sqlite"):
        return  # SQLite's B-trees do not deduplicate
    options = "SELECT coalesce(reloptions, '{}') FROM pg_class WHERE relname = 'ix_jobs_running'"
    _down_and_up(db_url, "0010", lambda conn: "deduplicate_items=off" in conn.execute(text(options)).scalar()).dispose()


def test_migration_0012_keeps_jobs_without_a_fuse_key_out_of_ix_jobs_gang_and_back(db_url):
    """A claim of a job without a fuse key wrote ix_jobs_gang (SQLite: a page in every cycle's commit), though
    no gang claim reads such a job through it. Down and up keep the jobs; a gang claim still takes keyed ones."""
    def keyed_only(conn) -> bool:
        definition = ("SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_gang'" if conn.dialect.name == "sqlite"
                      else "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_gang'")
        return "fuse_key IS NOT NULL" in conn.execute(text(definition)).scalar()

    engine = _down_and_up(db_url, "0011", keyed_only)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET fuse_key = 'k' WHERE id > (SELECT min(id) FROM jobs)"))
        queue = Queue(engine)
        worker = queue.register_worker("w", "h", ["noop"])
        assert [len(claim_gang(queue, worker, 8, trainers=["noop"])) for _ in range(3)] == [1, 2, 0]
        queue.close()
    finally:
        engine.dispose()


def fenced_write_buffers(queue: Queue, job) -> tuple[str, int]:
    """Postgres: the index a heartbeat's fenced UPDATE finds its job by, and the pages it reads there."""
    from scheduler.queue import _PG_HEARTBEAT

    params = {"b_job_id": job.id, "b_attempt_id": job.attempt_id, "b_worker_id": job.worker_id, "lease": 0.0,
              "step": None, "progress_done": None, "progress_total": None, "now": time.time(), "metrics": "[]"}
    with queue._autocommit.connection() as conn:
        conn.execute("SET plan_cache_mode = auto")  # a custom plan: EXPLAIN runs the statement unprepared
        try:
            plan = explain_analyze(conn, _PG_HEARTBEAT, params, buffers=True)["Plan"]
        finally:
            conn.execute("SET plan_cache_mode = force_generic_plan")
    nodes, scans = [plan], []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == "jobs" and "Index Name" in node:
            scans.append((node["Index Name"], node["Shared Hit Blocks"] + node["Shared Read Blocks"]))
    [scan] = scans
    return scan


def test_a_fenced_write_finds_its_job_by_the_primary_key_after_1500_finished_jobs(engine):
    """No index of `jobs` holds a running job's worker any more (migration 0016): the fenced UPDATE of every
    finish and heartbeat descends the primary key to its job, however many jobs its worker finished before
    (nothing vacuums here). With ix_jobs_running keyed by worker alone it read 15 pages after 1,500 jobs."""
    if engine.dialect.name == "sqlite":
        return  # SQLite deletes index entries in place
    queue = Queue(engine, expiry_scan_seconds=3600.0)
    try:
        submit(engine, "g", 1_600)  # ANALYZE: no job runs yet
        worker = queue.register_worker("w", "h", ["noop"])
        job = queue.claim(worker, trainers=["noop"])
        for _ in range(1_500):
            reply, job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", worker_id=worker,
                                                trainers=["noop"])
            assert reply.ok
        index, pages = fenced_write_buffers(queue, job)
        assert index == "jobs_pkey" and pages <= 4, (index, pages)
    finally:
        queue.close()


def explain_analyze(conn, statement: str, params: dict, buffers: bool = False) -> dict:
    """EXPLAIN ANALYZE of one statement, rolled back (a data-modifying statement changes nothing)."""
    options = "ANALYZE, BUFFERS, FORMAT JSON" if buffers else "ANALYZE, FORMAT JSON"
    with conn.transaction(force_rollback=True):
        return next(iter(conn.execute(f"EXPLAIN ({options}) " + statement, params).fetchone().values()))[0]


def test_no_hot_path_statement_is_jit_compiled_on_postgres(engine):
    """Under the Queue's enable_sort=off every plan that sorts costs over jit_above_cost: with the server's
    default jit a gang claim and an expiry scan each spent 0.05-0.4 s compiling, on every run."""
    if engine.dialect.name != "postgresql":
        return  # SQLite has no JIT
    from scheduler.gang import _pg_claim

    submit(engine, "jit", 40)
    queue = Queue(engine)
    now = time.time()
    claim = {"wid": "w", "lease": now + 60, "now": now, "k": 8, "code_rev": None,
             "from_rank": CLAIM_FLOOR[0], "from_id": CLAIM_FLOOR[1]}
    with queue._autocommit.connection() as conn:
        plans = {"gang claim": explain_analyze(conn, _pg_claim(ClaimFilters.of(None, 0.0, False, None)), claim),
                 "expiry scan": explain_analyze(conn, queue._sql(queue._expired_sql),
                                                {"now": now, "expired_since": 0.0})}
    assert plans["gang claim"]["Plan"]["Total Cost"] > 100_000  # over the default jit_above_cost
    assert {name: "JIT" in plan for name, plan in plans.items()} == {"gang claim": False, "expiry scan": False}
    with engine.connect() as conn:  # the engine's own connections (API reads over large grids) too
        assert conn.exec_driver_sql("SHOW jit").scalar() == "off"


def test_jit_off_keeps_the_server_options_a_database_url_names(db_url):
    """`?options=-c ...` in DATABASE_URL (a search_path, a timeout) still reaches both kinds of connection."""
    from sqlalchemy.engine import make_url

    if not db_url.startswith("postgresql"):
        return
    url = make_url(db_url).update_query_dict({"options": "-c statement_timeout=98765"})
    engine = make_engine(url.render_as_string(hide_password=False))
    queue = Queue(engine)
    try:
        with engine.connect() as conn:
            pooled = [conn.exec_driver_sql(f"SHOW {name}").scalar() for name in ("statement_timeout", "jit")]
        with queue._autocommit.connection() as conn:
            raw = [next(iter(conn.execute(f"SHOW {name}").fetchone().values()))
                   for name in ("statement_timeout", "jit", "enable_sort")]
        assert (pooled, raw) == (["98765ms", "off"], ["98765ms", "off", "off"])
    finally:
        queue.close()
        engine.dispose()


def test_a_claims_trainer_names_reach_the_database_as_the_same_strings(db_url):
    """The claim writes its filters into its statement (scheduler/claim_sql.py): trainer names with quotes,
    backslashes, commas, braces, spaces, SQL and the word NULL come back as the same strings, and a claim
    filters by them on both databases; a name the database cannot hold is refused by name."""
    names = ("noop", 'a"b', "it's", "''", "c\\d", "x,y", "{z}", "NULL", " sp ", "", "'); DROP TABLE jobs; --")
    engine = make_engine(db_url)
    queue = Queue(engine)
    try:
        with engine.connect() as conn:
            back = conn.execute(text("SELECT " + ", ".join(map(sql_string, names)))).one()
        assert tuple(back) == names
        submit(engine, "g", 2)
        worker = queue.register_worker("w", "h", ["noop"])
        assert queue.claim(worker, trainers=[name for name in names if name != "noop"]) is None
        assert queue.claim(worker, trainers=[]) is None
        assert queue.claim(worker, trainers=["{z}", "it's", "noop"]) is not None
        with pytest.raises(ValueError, match="NUL"):
            queue.claim(worker, trainers=["a\x00b"])
        with pytest.raises(ValueError, match="gpus must be a finite number"):
            queue.claim(worker, trainers=["noop"], gpus=float("nan"))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 2
    finally:
        queue.close()
        engine.dispose()


def test_claim_filters_are_one_statement_each_and_find_the_floor_by_their_values():
    filters = ClaimFilters.of(["b", "a", "b"], 1, 0, None)
    assert filters == (("a", "b"), 1.0, False, None) and hash(filters) == hash((("a", "b"), 1.0, False, None))
    assert filters.where() == ("claimable.gpus <= 1.0 AND claimable.trainer IN ('a', 'b') "
                               "AND claimable.code_rev IS NULL")
    assert ClaimFilters.of(None, 0.5, True, 7).where() == "claimable.gpus <= 0.5 AND claimable.grid_id = 7"
    assert ClaimFilters.of([], 0, True, None).where() == "claimable.gpus <= 0.0 AND 1 = 0"
    assert pick(filters, True) is pick((("a", "b"), 1.0, False, None), True)  # made once per filter set
