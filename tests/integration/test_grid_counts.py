"""A grid's counts by state without ix_jobs_grid_state (migration 0010), on SQLite and Postgres: they follow
claims, finishes of every outcome, retries, cancels and expired leases, and match the job rows one by one."""
from __future__ import annotations

from collections import Counter

from alembic import command
from sqlalchemy import func, inspect, select

from common import schema as t
from common.db import alembic_config, make_engine
from scheduler import reports
from scheduler.grids import cancel_grid, retry_job, submit_grid
from scheduler.policy import JOB_STATES, RetryPolicy
from scheduler.queue import Queue
from scheduler.reports import grid_summary, list_workers
from scheduler.spec import GridSpec
from worker.trainers import validate_config


def submit(engine, name: str, jobs: int, max_attempts: int = 3) -> int:
    spec = GridSpec.model_validate({"name": name, "trainer": "noop", "max_attempts": max_attempts,
                                    "axes": {"value": [float(i) for i in range(jobs)]}})
    return submit_grid(engine, spec, validate_config).grid_id


def counts_of(engine, grid: str) -> dict[str, int]:
    """grid_summary's counts, checked against the job rows themselves."""
    summary = grid_summary(engine, grid)
    with engine.connect() as conn:
        rows = Counter(conn.execute(select(t.jobs.c.state).where(t.jobs.c.grid_id == summary["id"])).scalars())
    assert summary["counts"] == {state: rows.get(state, 0) for state in JOB_STATES}
    assert summary["total"] == sum(rows.values())
    return {state: n for state, n in summary["counts"].items() if n}


def test_the_jobs_table_has_no_grid_state_index(engine):
    names = {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
    assert "ix_jobs_grid_state" not in names and "ix_jobs_external_id" in names


def test_migration_0010_goes_down_and_up_with_the_jobs_kept(db_url):
    engine = make_engine(db_url)
    try:
        submit(engine, "kept", 3)
        command.downgrade(alembic_config(db_url), "0009")
        assert "ix_jobs_grid_state" in {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
        command.upgrade(alembic_config(db_url), "head")
        assert "ix_jobs_grid_state" not in {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
        assert counts_of(engine, "kept") == {"queued": 3}
    finally:
        engine.dispose()


def test_counts_follow_claims_finishes_retries_and_cancels(engine):
    queue = Queue(engine, RetryPolicy(lease_seconds=30.0, max_lost=3, backoff_base_seconds=5.0))
    worker = queue.register_worker("w", "host", ["noop"])
    submit(engine, "g", 8, max_attempts=1)
    submit(engine, "other", 2)  # another grid's jobs are never counted in g's
    assert counts_of(engine, "g") == {"queued": 8}

    jobs = [queue.claim(worker, trainers=["noop"], grid_id=grid_summary(engine, "g")["id"]) for _ in range(6)]
    assert counts_of(engine, "g") == {"queued": 2, "running": 6}
    assert counts_of(engine, "other") == {"queued": 2}

    a, b, c, d, e, f = jobs
    assert queue.finish(a.id, a.attempt_id, "succeeded", {"loss": 0.5}, worker_id=worker).state == "succeeded"
    assert queue.finish(b.id, b.attempt_id, "error", error="boom", worker_id=worker).state == "failed"
    assert queue.finish(c.id, c.attempt_id, "preempted", worker_id=worker).state == "queued"
    assert queue.finish(d.id, d.attempt_id, "pruned", worker_id=worker).state == "pruned"
    assert counts_of(engine, "g") == {"queued": 3, "running": 2, "succeeded": 1, "failed": 1, "pruned": 1}
    # a second finish of the same attempt is refused and changes no count
    assert not queue.finish(a.id, a.attempt_id, "succeeded", {"loss": 0.1}, worker_id=worker).ok
    assert counts_of(engine, "g") == {"queued": 3, "running": 2, "succeeded": 1, "failed": 1, "pruned": 1}

    assert retry_job(engine, b.id) == "queued"
    assert counts_of(engine, "g") == {"queued": 4, "running": 2, "succeeded": 1, "pruned": 1}

    # e's lease expires: the claim's expiry scan requeues it as lost; f is running when the grid is cancelled
    later = f.lease_expires_at - 1.0
    assert queue.heartbeat(f.id, f.attempt_id, now=later, worker_id=worker).ok
    assert queue.requeue_expired(now=e.lease_expires_at + 1.0) == 1
    assert counts_of(engine, "g") == {"queued": 5, "running": 1, "succeeded": 1, "pruned": 1}
    cancel_grid(engine, "g")
    assert counts_of(engine, "g") == {"cancelled": 5, "running": 1, "succeeded": 1, "pruned": 1}
    reply = queue.heartbeat(f.id, f.attempt_id, now=later + 1.0, worker_id=worker)
    assert reply.ok and reply.cancel
    assert queue.finish(f.id, f.attempt_id, "error", error="stopped", worker_id=worker).state == "cancelled"
    assert counts_of(engine, "g") == {"cancelled": 6, "succeeded": 1, "pruned": 1}
    assert counts_of(engine, "other") == {"queued": 2}


def test_an_attempt_row_is_its_end_event_in_time_order_and_an_old_events_row_is_not_doubled(engine):
    """A succeeded finish writes no events row; GET /jobs/{id}/events shows its end from the attempt, between
    the events before and after it. A job finished by the code before (an events row for that end) shows it
    once."""
    queue = Queue(engine, RetryPolicy(lease_seconds=30.0))
    worker = queue.register_worker("w", "host", ["noop"])
    submit(engine, "g", 2)
    first = queue.claim(worker, trainers=["noop"], now=1000.0)
    assert queue.add_events(first.id, first.attempt_id, [("log", "before the end")], now=1500.0, worker_id=worker).ok
    assert queue.finish(first.id, first.attempt_id, "succeeded", {"loss": 1.0}, now=2000.0, worker_id=worker).ok
    with engine.begin() as conn:
        assert conn.execute(select(func.count()).select_from(t.events)
                            .where(t.events.c.kind == "succeeded")).scalar_one() == 0
        conn.execute(t.events.insert().values(job_id=first.id, time=2500.0, kind="note", message="after the end"))
    assert [(e["time"], e["kind"], e["attempt_id"]) for e in reports.job_events(engine, first.id)] == [
        (1500.0, "log", first.attempt_id), (2000.0, "succeeded", first.attempt_id), (2500.0, "note", None)]
    assert reports.job_events(engine, first.id, limit=2)[-1]["message"] == \
        "attempt ended: succeeded; job is now succeeded"

    second = queue.claim(worker, trainers=["noop"], now=3000.0)
    assert queue.finish(second.id, second.attempt_id, "succeeded", {"loss": 2.0}, now=4000.0, worker_id=worker).ok
    with engine.begin() as conn:  # as the code before this one left it
        conn.execute(t.events.insert().values(job_id=second.id, attempt_id=second.attempt_id, time=4000.0,
                                              kind="succeeded", message="attempt ended: succeeded; job is now succeeded"))
    assert [(e["kind"], e["id"] is not None) for e in reports.job_events(engine, second.id)] == [("succeeded", True)]

def test_each_finish_writes_its_attempt_and_event(engine):
    """The finish statement (Postgres: one statement per shape, constants in its text) ends the attempt with
    its outcome and error and adds one event, for each outcome (as GET /jobs/{id}/events reads them: for
    succeeded, cancelled and pruned the attempt row is the event); the job row gets the new state's values."""
    queue = Queue(engine, RetryPolicy(lease_seconds=30.0, max_lost=3, backoff_base_seconds=5.0))
    worker = queue.register_worker("w", "host", ["noop"])
    submit(engine, "g", 5)
    outcomes = [("succeeded", None), ("error", "boom"), ("preempted", None), ("cancelled", "stop"), ("pruned", None)]
    for outcome, error in outcomes:
        job = queue.claim(worker, trainers=["noop"], now=1000.0)
        reply = queue.finish(job.id, job.attempt_id, outcome, {"loss": 1.0} if outcome == "succeeded" else None,
                             error=error, now=2000.0, worker_id=worker)
        assert reply.ok
        with engine.connect() as conn:
            attempt = conn.execute(select(t.attempts).where(t.attempts.c.id == job.attempt_id)).mappings().one()
            row = conn.execute(select(t.jobs).where(t.jobs.c.id == job.id)).mappings().one()
        assert (attempt["outcome"], attempt["ended_at"], attempt["error"]) == (outcome, 2000.0, error)
        events = [(e["kind"], e["message"]) for e in reports.job_events(engine, job.id)
                  if e["attempt_id"] == job.attempt_id]
        assert [kind for kind, _ in events] == [outcome]
        assert events[0][1].startswith(f"attempt ended: {outcome}; job is now {reply.state}")
        assert (row["attempt_id"], row["worker_id"], row["lease_expires_at"]) == (None, None, None)
        assert row["state"] == reply.state
        [shown] = [w for w in list_workers(engine) if w["id"] == worker]  # derived from its running jobs
        assert (shown["state"], shown["current_job_id"]) == ("idle", None)
        if outcome == "succeeded":
            assert row["result"] == {"loss": 1.0} and row["finished_at"] == 2000.0
        if outcome == "error":
            assert row["errors"] == 1 and row["last_error"] == "boom" and row["not_before"] > 2000.0
        if outcome == "preempted":
            assert row["preemptions"] == 1 and row["not_before"] == 2000.0
        if outcome == "cancelled":
            assert row["last_error"] == "stop" and row["finished_at"] == 2000.0
