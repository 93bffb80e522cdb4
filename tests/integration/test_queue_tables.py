"""The queue's narrow tables (migration 0016): triggers keep `claimable` and `running` equal to the queued and
running jobs whatever moves a job, on SQLite and Postgres; job-row updates of the cycle stay HOT on Postgres;
and claims racing cancels in real processes never deadlock, lose or double a job."""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections import Counter

from sqlalchemy import text

from common.db import make_engine
from scheduler import grids
from scheduler.gang import claim_gang
from scheduler.grids import submit_grid
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.spec import GridSpec
from worker.trainers import fuse_key, validate_config

SPAWN = mp.get_context("spawn")


def submit(engine, name: str, jobs: int, priority: int = 0) -> int:
    """`jobs` noop jobs, all of one fuse key (a gang claim takes several of them)."""
    spec = GridSpec.model_validate({"name": name, "trainer": "noop", "priority": priority,
                                    "axes": {"value": [float(i) for i in range(jobs)], "fuse_group": ["a"]}})
    return submit_grid(engine, spec, validate_config, fuse_key=fuse_key).grid_id


def assert_tables_follow_jobs(engine) -> tuple[int, int]:
    """`claimable` holds exactly the queued jobs with their current values, `running` exactly the running
    ones by worker. Returns how many of each."""
    with engine.connect() as conn:
        queued = set(conn.execute(text(
            "SELECT -priority, id, grid_id, trainer, gpus, code_rev, not_before, fuse_key FROM jobs "
            "WHERE state = 'queued'")).all())
        claimable = set(conn.execute(text(
            "SELECT rank, job_id, grid_id, trainer, gpus, code_rev, not_before, fuse_key FROM claimable")).all())
        running = set(conn.execute(text("SELECT worker_id, id FROM jobs WHERE state = 'running'")).all())
        listed = set(conn.execute(text("SELECT worker_id, job_id FROM running")).all())
    assert claimable == queued, (claimable ^ queued)
    assert listed == running, (listed ^ running)
    return len(queued), len(running)


def test_claimable_and_running_follow_every_move_of_a_job(engine):
    queue = Queue(engine, RetryPolicy(lease_seconds=30.0, max_lost=3, backoff_base_seconds=5.0))
    worker, other = (queue.register_worker(name, "host", ["noop"]) for name in ("w", "v"))
    g = submit(engine, "g", 6)
    assert assert_tables_follow_jobs(engine) == (6, 0)  # submitted: all claimable
    t0 = time.time()
    a, b, c = (queue.claim(worker, trainers=["noop"], now=t0) for _ in range(3))
    assert assert_tables_follow_jobs(engine) == (3, 3)
    assert queue.finish(a.id, a.attempt_id, "succeeded", {"loss": 1.0}, now=t0, worker_id=worker).ok
    assert queue.finish(b.id, b.attempt_id, "error", error="boom", now=t0, worker_id=worker).ok  # retried later
    assert queue.finish(c.id, c.attempt_id, "preempted", now=t0, worker_id=worker).ok  # queued again at once
    assert assert_tables_follow_jobs(engine) == (5, 0)
    d = queue.claim(other, trainers=["noop"], now=t0)
    assert assert_tables_follow_jobs(engine) == (4, 1)
    assert queue.claim(worker, trainers=["noop"], now=t0 + 100.0) is not None  # d's lease expired: requeued
    assert assert_tables_follow_jobs(engine) == (4, 1)
    assert not queue.heartbeat(d.id, d.attempt_id, step=1, now=t0 + 100.0, worker_id=other).ok
    with engine.begin() as conn:  # a grid's priority changes its queued jobs' rank in claimable
        conn.execute(text("UPDATE jobs SET priority = 7 WHERE grid_id = :g AND state = 'queued'"), {"g": g})
    assert assert_tables_follow_jobs(engine) == (4, 1)
    keyed = submit(engine, "keyed", 4, priority=10)  # before g's jobs in claim order
    gang = claim_gang(queue, worker, 3, trainers=["noop"])
    assert len(gang) == 3 and assert_tables_follow_jobs(engine) == (5, 4)
    grids.pause_grid(engine, "g")  # its jobs stay queued: a claim checks the grid's state
    grids.cancel_grid(engine, keyed)  # its queued job leaves claimable; its running ones are asked to stop
    assert assert_tables_follow_jobs(engine) == (4, 4)
    grids.resume_grid(engine, "g")
    with engine.connect() as conn:
        queued = conn.execute(text("SELECT min(id) FROM jobs WHERE grid_id = :g AND state = 'queued'"),
                              {"g": g}).scalar()
    assert grids.cancel_job(engine, queued) == "cancelled" and assert_tables_follow_jobs(engine) == (3, 4)
    assert grids.retry_job(engine, queued) == "queued" and assert_tables_follow_jobs(engine) == (4, 4)
    x = queue.claim(other, trainers=["noop"], now=t0 + 1_000.0)  # every lease before expired: requeued
    assert queue.requeue_expired(now=t0 + 1_100.0) >= 1  # x's too
    with engine.connect() as conn:
        assert conn.execute(text("SELECT state FROM jobs WHERE id = :id"), {"id": x.id}).scalar() == "queued"
    assert queue.heartbeat(x.id, x.attempt_id, step=1, now=t0 + 1_100.0, worker_id=other).ok  # regained
    queued, running = assert_tables_follow_jobs(engine)
    assert running == 1
    assert queue.finish(x.id, x.attempt_id, "succeeded", now=t0 + 1_100.0, worker_id=other).ok
    while (job := queue.claim(worker, trainers=["noop"], now=t0 + 1_100.0)) is not None:
        assert queue.finish(job.id, job.attempt_id, "succeeded", now=t0 + 1_100.0, worker_id=worker).ok
    assert assert_tables_follow_jobs(engine) == (0, 0)
    queue.close()


def test_claims_and_finishes_update_the_job_rows_hot(engine):
    """No index of `jobs` holds a column the cycle writes, so Postgres updates the job row in place on its
    page (HOT): no index entry per claim or finish, no dead ones for later scans."""
    if engine.dialect.name == "sqlite":
        return  # SQLite has no HOT updates: it rewrites the row and its changed index entries in place
    submit(engine, "hot", 400)
    queue = Queue(engine, expiry_scan_seconds=3600.0)
    worker = queue.register_worker("w", "h", ["noop"])
    with engine.connect() as conn:
        options = conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'jobs'")).scalar()
        before = conn.execute(text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                                   "WHERE relname = 'jobs'")).one()
    assert "fillfactor=50" in options
    job = queue.claim(worker, trainers=["noop"])
    for _ in range(300):
        reply, job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", worker_id=worker, trainers=["noop"])
        assert reply.ok and job is not None
        assert queue.heartbeat(job.id, job.attempt_id, step=1, worker_id=worker).ok
    queue.close()  # its backends report their statistics when they end
    deadline = time.monotonic() + 30.0
    while True:
        with engine.connect() as conn:
            updates, hot = conn.execute(text("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                                             "WHERE relname = 'jobs'")).one()
        updates, hot = updates - before[0], hot - before[1]
        if updates >= 900 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert updates >= 900, updates  # 301 claims, 300 finishes, 300 heartbeats
    assert hot >= 0.9 * updates, (hot, updates)


def _claimer(db_url: str, name: str, gang: bool, start, results) -> None:
    """Claim and finish until nothing is left; one report of everything claimed."""
    claimed: list[tuple[int, str]] = []
    try:
        engine = make_engine(db_url)
        queue = Queue(engine, RetryPolicy(lease_seconds=600.0), expiry_scan_seconds=0.05)
        worker = queue.register_worker(name, "host", ["noop"])
        start.wait(timeout=120)
        idle_since = None
        while idle_since is None or time.monotonic() - idle_since < 1.0:
            jobs = claim_gang(queue, worker, 3, trainers=["noop"]) if gang else \
                [j for j in [queue.claim(worker, trainers=["noop"])] if j is not None]
            if not jobs:  # cancels may still be racing: a job cancelled while queued is never claimed
                idle_since = idle_since or time.monotonic()
                time.sleep(0.02)
                continue
            idle_since = None
            for job in jobs:
                claimed.append((job.id, job.attempt_id))
                time.sleep(0.005)  # it trains: the canceller's front meets the claimers' on a fast machine too
                queue.finish(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=worker)
        queue.close()
        engine.dispose()
        results.put({"name": name, "claimed": claimed, "error": None})
    except BaseException:  # noqa: BLE001 - report everything to the test process
        results.put({"name": name, "claimed": claimed, "error": traceback.format_exc()})


def test_claims_racing_cancels_in_four_processes_never_deadlock_lose_or_double_a_job(db_url, engine):
    """A claim locks the job row and its trigger then deletes the claimable row, the order a cancel takes
    them in: with the claimable row locked first, a claim and a cancel of the same job deadlocked."""
    grid = submit(engine, "race", 300)
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM jobs WHERE grid_id = :g"), {"g": grid}).scalars().all()
    start, results = SPAWN.Barrier(5), SPAWN.Queue()
    processes = [SPAWN.Process(target=_claimer, args=(db_url, f"w{i}", i % 2 == 1, start, results)) for i in range(4)]
    for process in processes:
        process.start()
    with engine.connect() as conn:  # the canceller's connection is open before the start, as the claimers' are
        conn.execute(text("SELECT 1"))
    start.wait(timeout=120)
    cancelled = []
    for job_id in sorted(ids, reverse=True)[::2]:  # from the last, while the claimers take the first: they meet
        try:
            cancelled.append((job_id, grids.cancel_job(engine, job_id)))
        except grids.Conflict:  # it succeeded already
            cancelled.append((job_id, "ended"))
    reports = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    errors = [r["error"] for r in reports if r["error"]]
    assert not errors, "\n".join(errors)
    claimed = Counter(job_id for r in reports for job_id, _ in r["claimed"])
    assert max(claimed.values()) == 1  # none twice
    with engine.connect() as conn:
        states = dict(conn.execute(text("SELECT id, state FROM jobs WHERE grid_id = :g"), {"g": grid}).all())
        attempts = Counter(conn.execute(text("SELECT job_id FROM attempts")).scalars())
    assert set(states.values()) <= {"succeeded", "cancelled"}, Counter(states.values())
    assert {i for i, s in states.items() if s == "succeeded"} == set(claimed)  # every claimed job finished once
    assert all(states[i] == "cancelled" for i in ids if i not in claimed)  # and none was lost
    assert attempts == claimed
    outcomes = Counter(state for _, state in cancelled)
    assert outcomes["cancelled"] >= 1 and len(claimed) >= 100, (outcomes, len(claimed))
    assert assert_tables_follow_jobs(engine) == (0, 0)


def test_migration_0016_carries_queued_and_running_jobs_into_the_tables_and_back(db_url):
    from alembic import command
    from sqlalchemy import inspect

    from common.db import alembic_config

    engine = make_engine(db_url)
    queue = Queue(engine)
    try:
        submit(engine, "kept", 5)
        worker = queue.register_worker("w", "h", ["noop"])
        held = [queue.claim(worker, trainers=["noop"]) for _ in range(2)]
        command.downgrade(alembic_config(db_url), "0015")
        inspector = inspect(engine)
        assert "claimable" not in inspector.get_table_names() and "running" not in inspector.get_table_names()
        assert "ix_jobs_running" in {ix["name"] for ix in inspector.get_indexes("jobs")}  # the partial indexes
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs WHERE state = 'queued'")).scalar() == 3
        command.upgrade(alembic_config(db_url), "head")
        assert assert_tables_follow_jobs(engine) == (3, 2)
        for job in held:  # the jobs that ran through the migration finish, the queued ones are claimed
            assert queue.finish(job.id, job.attempt_id, "succeeded", worker_id=worker).ok
        while (job := queue.claim(worker, trainers=["noop"])) is not None:
            assert queue.finish(job.id, job.attempt_id, "succeeded", worker_id=worker).ok
        assert assert_tables_follow_jobs(engine) == (0, 0)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs WHERE state = 'succeeded'")).scalar() == 5
    finally:
        queue.close()
        engine.dispose()
