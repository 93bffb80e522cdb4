"""The queue on real databases (every test runs on SQLite and on Postgres): claim order and filters,
leases and fencing, failure kinds with their budgets and backoff, cancel/retry, and the read models.

Time moves through the `now=` parameters, never by sleeping.
"""
from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.pool import NullPool

from common import schema as t
from common.db import make_engine
from scheduler import reports
from scheduler.grids import (
    Conflict,
    NotFound,
    cancel_grid,
    cancel_job,
    pause_grid,
    resume_grid,
    retry_job,
    submit_grid,
)
from scheduler.policy import RetryPolicy
from scheduler.queue import ANALYZE_AFTER_ROWS, Metric, Queue
from scheduler.spec import GridSpec
from worker.trainers import validate_config

LEASE = 30.0  # the `policy` fixture's lease


def submit(engine, name="g", trainer="noop", **fields):
    spec = GridSpec.model_validate({"name": name, "trainer": trainer, **fields})
    return submit_grid(engine, spec, validate_config)


def job_ids(engine, grid_id):
    with engine.connect() as conn:
        return list(conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid_id).order_by(t.jobs.c.id)).scalars())


def job(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one()


def attempts(engine, job_id):
    with engine.connect() as conn:
        return conn.execute(
            select(t.attempts).where(t.attempts.c.job_id == job_id).order_by(t.attempts.c.started_at)
        ).mappings().all()


def count(engine, table, *where):
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


@pytest.fixture
def t0():
    return time.time()


# ---- claim order and filters -----------------------------------------------------------------------
def test_claim_order_is_priority_desc_then_age(engine, queue, t0):
    low = submit(engine, "low", axes={"value": [1.0, 2.0, 3.0]}, priority=0)
    high = submit(engine, "high", axes={"value": [4.0, 5.0]}, priority=5)
    mid = submit(engine, "mid", axes={"value": [6.0]}, priority=2)
    later_low = submit(engine, "later-low", axes={"value": [7.0]}, priority=0)
    expected = job_ids(engine, high.grid_id) + job_ids(engine, mid.grid_id) + job_ids(engine, low.grid_id) \
        + job_ids(engine, later_low.grid_id)
    claimed = []
    while (claimed_job := queue.claim("w", now=t0)) is not None:
        claimed.append(claimed_job.id)
    assert claimed == expected
    # configs come back intact, in creation order within a priority
    assert [job(engine, i)["config"]["value"] for i in claimed] == [4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 7.0]


def test_claim_returns_the_full_job(engine, queue, t0):
    grid = submit(engine, "g", config={"value": 2.5}, seeds=[42], resources={"gpus": 0.5, "gpu_memory_gb": 8})
    claimed = queue.claim("w1", gpus=1.0, now=t0)
    assert claimed is not None
    assert claimed.grid_id == grid.grid_id
    assert claimed.trainer == "noop"
    assert claimed.config == {"value": 2.5}
    assert claimed.seed == 42
    assert claimed.resources == {"gpus": 0.5, "gpu_memory_gb": 8}
    assert claimed.attempt == 1
    assert claimed.checkpoint is None
    assert claimed.lease_expires_at == pytest.approx(t0 + LEASE)
    row = job(engine, claimed.id)
    assert row["state"] == "running"
    assert row["attempt_id"] == claimed.attempt_id
    assert row["worker_id"] == "w1"
    [attempt] = attempts(engine, claimed.id)
    assert attempt["id"] == claimed.attempt_id and attempt["outcome"] == "running"
    assert queue.claim("w2", gpus=1.0, now=t0) is None


def test_not_before_backoff_is_honoured(engine, queue, t0):
    submit(engine, "g", max_attempts=5)
    first = queue.claim("w", now=t0)
    reply = queue.finish(first.id, first.attempt_id, "error", error="boom", now=t0, worker_id=first.worker_id)
    assert reply.ok and reply.state == "queued"
    assert job(engine, first.id)["not_before"] == pytest.approx(t0 + 5.0)
    assert queue.claim("w", now=t0) is None
    assert queue.claim("w", now=t0 + 4.9) is None
    again = queue.claim("w", now=t0 + 5.0)
    assert again is not None and again.id == first.id and again.attempt == 2


def test_backoff_does_not_block_other_jobs(engine, queue, t0):
    grid = submit(engine, "g", axes={"value": [1.0, 2.0]})
    first_id, second_id = job_ids(engine, grid.grid_id)
    first = queue.claim("w", now=t0)
    assert first.id == first_id
    queue.finish(first.id, first.attempt_id, "error", error="boom", now=t0, worker_id=first.worker_id)
    other = queue.claim("w", now=t0 + 1)
    assert other.id == second_id


def test_trainer_filter(engine, queue, t0):
    noop = submit(engine, "n", trainer="noop", priority=10)
    sleep = submit(engine, "s", trainer="sleep")
    assert queue.claim("w", trainers=[], now=t0) is None
    assert queue.claim("w", trainers=["other"], now=t0) is None
    got = queue.claim("w", trainers=["sleep"], now=t0)
    assert got is not None and got.trainer == "sleep" and got.id == job_ids(engine, sleep.grid_id)[0]
    assert queue.claim("w", trainers=["sleep"], now=t0) is None
    got = queue.claim("w", trainers=["sleep", "noop"], now=t0)
    assert got is not None and got.id == job_ids(engine, noop.grid_id)[0]


def test_no_trainer_filter_claims_any(engine, queue, t0):
    submit(engine, "s", trainer="sleep")
    got = queue.claim("w", trainers=None, now=t0)
    assert got is not None and got.trainer == "sleep"


def test_gpu_filter(engine, queue, t0):
    grid = submit(engine, "g", resources={"gpus": 0.5})
    assert queue.claim("w", gpus=0.0, now=t0) is None
    assert queue.claim("w", gpus=0.25, now=t0) is None
    got = queue.claim("w", gpus=0.5, now=t0)
    assert got is not None and got.id == job_ids(engine, grid.grid_id)[0]


def test_gpu_filter_skips_to_a_job_that_fits(engine, queue, t0):
    submit(engine, "big", resources={"gpus": 1.0}, priority=10)
    small = submit(engine, "small", resources={"gpus": 0.25})
    got = queue.claim("w", gpus=0.5, now=t0)
    assert got is not None and got.id == job_ids(engine, small.grid_id)[0]


def test_code_rev_pinned_jobs_need_can_pin_code(engine, queue, t0):
    pinned = submit(engine, "pinned", code_rev="abc1234", priority=10)
    plain = submit(engine, "plain")
    got = queue.claim("w", can_pin_code=False, code_rev="fff0000", now=t0)
    assert got is not None and got.id == job_ids(engine, plain.grid_id)[0] and got.code_rev is None
    assert attempts(engine, got.id)[0]["code_rev"] == "fff0000"  # the worker's own revision
    assert queue.claim("w", can_pin_code=False, now=t0) is None
    got = queue.claim("w", can_pin_code=True, code_rev="fff0000", now=t0)
    assert got is not None and got.id == job_ids(engine, pinned.grid_id)[0] and got.code_rev == "abc1234"
    assert attempts(engine, got.id)[0]["code_rev"] == "abc1234"  # the job runs the pinned revision


def test_paused_grid_is_not_claimed_until_resumed(engine, queue, t0):
    paused = submit(engine, "paused", axes={"value": [1.0, 2.0]}, priority=10)
    other = submit(engine, "other")
    running = queue.claim("w", now=t0)
    assert running.grid_id == paused.grid_id
    assert pause_grid(engine, "paused") == "paused"
    assert pause_grid(engine, "paused") == "paused"  # idempotent
    got = queue.claim("w", now=t0)
    assert got.grid_id == other.grid_id
    assert queue.claim("w", now=t0) is None
    # the running job of a paused grid keeps running
    assert queue.heartbeat(running.id, running.attempt_id, now=t0 + 1, worker_id=running.worker_id).ok
    assert queue.finish(running.id, running.attempt_id, "succeeded", now=t0 + 2,
                        worker_id=running.worker_id).state == "succeeded"
    assert reports.grid_summary(engine, "paused")["state"] == "paused"
    assert resume_grid(engine, paused.grid_id) == "active"
    got = queue.claim("w", now=t0 + 3)
    assert got is not None and got.id == job_ids(engine, paused.grid_id)[1]


def test_grid_state_transitions(engine):
    submit(engine, "g")
    with pytest.raises(NotFound):
        pause_grid(engine, "nope")
    assert cancel_grid(engine, "g") == "cancelled"
    with pytest.raises(Conflict):
        pause_grid(engine, "g")
    assert resume_grid(engine, "g") == "active"


# ---- heartbeats and leases --------------------------------------------------------------------------
def test_heartbeat_extends_lease_and_stores_progress(engine, queue, t0):
    submit(engine, "g")
    worker = queue.register_worker("w", "host", ["noop"])
    claimed = queue.claim(worker, now=t0)
    reply = queue.heartbeat(
        claimed.id, claimed.attempt_id, step=10, progress=(10, 40),
        metrics=[Metric(step=5, values={"loss": 0.5}, time=t0 + 1), Metric(step=10, values={"loss": 0.25}, time=t0 + 2)],
        now=t0 + 20, worker_id=claimed.worker_id,
    )
    assert reply.ok and not reply.stop and not reply.cancel
    assert reply.lease_expires_at == pytest.approx(t0 + 20 + LEASE)
    row = job(engine, claimed.id)
    assert row["lease_expires_at"] == pytest.approx(t0 + 20 + LEASE)
    assert row["step"] == 10 and row["progress_done"] == 10 and row["progress_total"] == 40
    metrics = reports.job_metrics(engine, claimed.id)
    assert [(m["step"], m["loss"], m["attempt_id"]) for m in metrics] == [
        (5, 0.5, claimed.attempt_id), (10, 0.25, claimed.attempt_id)
    ]
    assert [m["step"] for m in reports.job_metrics(engine, claimed.id, after_step=5)] == [10]
    # past the first lease but inside the extended one: nobody can take the job
    assert queue.claim("other", now=t0 + LEASE + 5) is None
    assert job(engine, claimed.id)["attempt_id"] == claimed.attempt_id
    [w] = [w for w in reports.list_workers(engine) if w["id"] == worker]
    assert w["state"] == "busy" and w["current_job_id"] == claimed.id
    assert w["last_seen_at"] == pytest.approx(t0 + 20)


def test_set_checkpoint_is_handed_to_the_next_attempt(engine, queue, t0):
    submit(engine, "g")
    a = queue.claim("a", now=t0)
    pointer = {"uri": "local:/ckpt/1/step-7", "step": 7, "time": t0 + 1}
    assert queue.set_checkpoint(a.id, a.attempt_id, pointer, worker_id=a.worker_id).ok
    assert job(engine, a.id)["step"] == 7
    b = queue.claim("b", now=t0 + LEASE + 1)
    assert b.id == a.id and b.attempt_id != a.attempt_id
    assert b.checkpoint == pointer


def test_grid_store_rides_on_the_claimed_job(engine, queue, t0):
    submit(engine, "hub", store="hf://alice/ckpts@runs")
    submit(engine, "plain")
    stores = {queue.claim("a", now=t0).store, queue.claim("b", now=t0).store}
    assert stores == {"hf://alice/ckpts@runs", None}


def test_final_checkpoint_may_land_after_success_but_only_from_the_succeeding_attempt(engine, queue, t0):
    submit(engine, "g")
    a = queue.claim("a", now=t0)
    assert queue.finish(a.id, a.attempt_id, "preempted", now=t0 + 1, worker_id=a.worker_id).ok
    b = queue.claim("b", now=t0 + 2)
    assert queue.finish(b.id, b.attempt_id, "succeeded", result={"loss": 1.0}, now=t0 + 3, worker_id=b.worker_id).ok
    late = {"uri": "hf://alice/ckpts/grid-1/job-1/ckpt-000000000009.pt", "revision": "abc", "step": 9, "time": t0}
    # The preempted attempt's upload arrives late: refused, the job keeps what it had.
    assert not queue.set_checkpoint(a.id, a.attempt_id, late, worker_id=a.worker_id).ok
    assert job(engine, a.id)["checkpoint"] is None
    assert queue.set_checkpoint(b.id, b.attempt_id, late, worker_id=b.worker_id).ok
    row = job(engine, b.id)
    assert row["checkpoint"] == late and row["state"] == "succeeded" and row["result"] == {"loss": 1.0}


def test_lease_expiry_reclaims_with_a_new_attempt_and_fences_the_old_one(engine, queue, t0):
    submit(engine, "g", config={"value": 1.0})
    a = queue.claim("worker-a", now=t0)
    assert queue.claim("worker-b", now=t0 + LEASE - 1) is None  # lease still valid
    b = queue.claim("worker-b", now=t0 + LEASE + 1)
    assert b is not None and b.id == a.id
    assert b.attempt_id != a.attempt_id
    assert b.attempt == 2

    stale = queue.heartbeat(a.id, a.attempt_id, step=3, metrics=[Metric(3, {"loss": 9.0})], now=t0 + LEASE + 2,
                            worker_id=a.worker_id)
    assert (stale.ok, stale.stop) == (False, True)
    assert a.attempt_id in stale.reason
    stale = queue.set_checkpoint(a.id, a.attempt_id, {"uri": "local:/stale", "step": 3}, worker_id=a.worker_id)
    assert (stale.ok, stale.stop) == (False, True)
    stale = queue.add_events(a.id, a.attempt_id, [("log", "from a stale attempt")], now=t0 + LEASE + 2,
                             worker_id=a.worker_id)
    assert (stale.ok, stale.stop) == (False, True)
    stale = queue.finish(a.id, a.attempt_id, "succeeded", result={"loss": 9.0}, now=t0 + LEASE + 3,
                         worker_id=a.worker_id)
    assert (stale.ok, stale.stop) == (False, True)

    row = job(engine, a.id)
    assert row["state"] == "running" and row["attempt_id"] == b.attempt_id and row["worker_id"] == "worker-b"
    assert row["checkpoint"] is None and row["step"] is None and row["losses"] == 1
    assert count(engine, t.metrics, t.metrics.c.attempt_id == a.attempt_id) == 0
    assert count(engine, t.events, t.events.c.attempt_id == a.attempt_id, t.events.c.kind == "log") == 0

    assert queue.heartbeat(b.id, b.attempt_id, now=t0 + LEASE + 4, worker_id=b.worker_id).ok
    assert queue.add_events(b.id, b.attempt_id, [("log", "hello")], now=t0 + LEASE + 4, worker_id=b.worker_id).ok
    done = queue.finish(b.id, b.attempt_id, "succeeded", result={"loss": 1.0}, now=t0 + LEASE + 5,
                        worker_id=b.worker_id)
    assert done.ok and done.state == "succeeded"
    # a late finish from A after B's success changes nothing
    assert not queue.finish(a.id, a.attempt_id, "succeeded", result={"loss": 9.0}, now=t0 + LEASE + 6,
                            worker_id=a.worker_id).ok

    row = job(engine, a.id)
    assert row["state"] == "succeeded" and row["result"] == {"loss": 1.0}
    assert row["attempt_id"] is None and row["lease_expires_at"] is None
    outcomes = {r["id"]: r["outcome"] for r in attempts(engine, a.id)}
    assert outcomes == {a.attempt_id: "lost", b.attempt_id: "succeeded"}
    assert count(engine, t.attempts, t.attempts.c.outcome == "succeeded") == 1
    kinds = [e["kind"] for e in reports.job_events(engine, a.id)]
    assert kinds.count("lost") == 1 and kinds.count("succeeded") == 1 and kinds.count("log") == 1
    # nothing left to claim, now or much later
    assert queue.claim("worker-c", now=t0 + 10 * LEASE) is None


def test_requeue_expired_without_a_claim(engine, queue, t0):
    grid = submit(engine, "g", axes={"value": [1.0, 2.0]})
    a = queue.claim("a", now=t0)
    b = queue.claim("b", now=t0 + 10)
    assert queue.requeue_expired(now=t0 + LEASE + 1) == 1  # only a's lease has expired
    assert job(engine, a.id)["state"] == "queued"
    assert job(engine, b.id)["state"] == "running"
    assert queue.requeue_expired(now=t0 + LEASE + 1) == 0
    assert [job(engine, i)["losses"] for i in job_ids(engine, grid.grid_id)] == [1, 0]


def test_lost_budget_fails_the_job_after_max_lost_expiries(engine, t0):
    policy = RetryPolicy(lease_seconds=LEASE, max_lost=3, backoff_base_seconds=5.0)
    queue = Queue(engine, policy)
    submit(engine, "g", max_attempts=10)
    now = t0
    claims = []
    for loss in range(1, policy.max_lost + 1):
        claimed = queue.claim(f"w{loss}", now=now)
        assert claimed is not None, f"claim {loss} found nothing"
        claims.append(claimed)
        now = claimed.lease_expires_at + 1
        assert queue.requeue_expired(now=now) == 1
        row = job(engine, claimed.id)
        assert row["losses"] == loss
        if loss < policy.max_lost:
            assert row["state"] == "queued"
            assert row["not_before"] == pytest.approx(now + policy.backoff("lost", loss))
            if row["not_before"] > now:
                assert queue.claim("early", now=now) is None
            now = row["not_before"]
    row = job(engine, claims[0].id)
    assert row["state"] == "failed"
    assert "lease expired" in row["last_error"] and "giving up" in row["last_error"]
    assert row["errors"] == 0
    assert [a["outcome"] for a in attempts(engine, row["id"])] == ["lost"] * policy.max_lost
    assert queue.claim("late", now=now + 10_000) is None


def test_error_retries_with_exponential_backoff_then_fails(engine, queue, policy, t0):
    submit(engine, "g", max_attempts=4)
    now = t0
    for n in range(1, 5):
        claimed = queue.claim("w", now=now)
        assert claimed is not None and claimed.attempt == n
        reply = queue.finish(claimed.id, claimed.attempt_id, "error", error=f"boom {n}", now=now + 1,
                             worker_id=claimed.worker_id)
        row = job(engine, claimed.id)
        assert row["errors"] == n and row["last_error"] == f"boom {n}"
        if n < 4:
            assert reply.state == "queued" and row["state"] == "queued"
            wait = policy.backoff("error", n)
            assert wait == 5.0 * 2 ** (n - 1)
            assert row["not_before"] == pytest.approx(now + 1 + wait)
            assert queue.claim("w", now=now + 1 + wait - 0.5) is None
            now = now + 1 + wait
        else:
            assert reply.state == "failed" and row["state"] == "failed"
            assert row["finished_at"] == pytest.approx(now + 1)
    assert [a["outcome"] for a in attempts(engine, claimed.id)] == ["error"] * 4
    assert [a["error"] for a in attempts(engine, claimed.id)] == [f"boom {n}" for n in range(1, 5)]
    assert queue.claim("w", now=now + 10_000) is None


def test_preemption_never_uses_the_error_budget(engine, queue, t0):
    submit(engine, "g", max_attempts=2)
    for n in range(1, 7):  # more preemptions than max_attempts
        claimed = queue.claim("w", now=t0)  # requeued at once: claimable at the same instant
        assert claimed is not None and claimed.attempt == n
        reply = queue.finish(claimed.id, claimed.attempt_id, "preempted", now=t0, worker_id=claimed.worker_id)
        assert reply.ok and reply.state == "queued"
    row = job(engine, claimed.id)
    assert row["preemptions"] == 6 and row["errors"] == 0
    # the full error budget is still there: one error is retried
    claimed = queue.claim("w", now=t0)
    assert queue.finish(claimed.id, claimed.attempt_id, "error", error="x", now=t0,
                        worker_id=claimed.worker_id).state == "queued"
    claimed = queue.claim("w", now=t0 + 1000)
    assert queue.finish(claimed.id, claimed.attempt_id, "succeeded", result={"loss": 0.0}, now=t0 + 1000,
                        worker_id=claimed.worker_id).state \
        == "succeeded"
    outcomes = [a["outcome"] for a in attempts(engine, claimed.id)]
    assert outcomes == ["preempted"] * 6 + ["error", "succeeded"]


def test_preemption_loop_ends_at_max_preemptions(engine, t0):
    queue = Queue(engine, RetryPolicy(lease_seconds=LEASE, max_preemptions=2))
    submit(engine, "g")
    states = []
    for _ in range(3):
        claimed = queue.claim("w", now=t0)
        states.append(queue.finish(claimed.id, claimed.attempt_id, "preempted", now=t0,
                                   worker_id=claimed.worker_id).state)
    assert states == ["queued", "queued", "failed"]
    assert "preempted 3 times" in job(engine, claimed.id)["last_error"]


def test_invalid_finish_outcome_is_a_value_error_and_changes_nothing(engine, queue, t0):
    submit(engine, "g")
    claimed = queue.claim("w", now=t0)
    for outcome in ("success", "lost", "failed", ""):
        with pytest.raises(ValueError, match="outcome must be one of"):
            queue.finish(claimed.id, claimed.attempt_id, outcome, now=t0, worker_id=claimed.worker_id)
    row = job(engine, claimed.id)
    assert row["state"] == "running" and row["attempt_id"] == claimed.attempt_id


def test_finish_unknown_job_is_refused(engine, queue):
    reply = queue.finish(12345, "0" * 32, "succeeded", worker_id="w")
    assert not reply.ok and reply.stop


# ---- cancel and retry ---------------------------------------------------------------------------------
def test_cancel_queued_job(engine, queue, t0):
    grid = submit(engine, "g")
    [job_id] = job_ids(engine, grid.grid_id)
    assert cancel_job(engine, job_id) == "cancelled"
    assert job(engine, job_id)["state"] == "cancelled"
    assert queue.claim("w", now=t0) is None
    with pytest.raises(Conflict):
        cancel_job(engine, job_id)
    with pytest.raises(NotFound):
        cancel_job(engine, 99999)


def test_cancel_running_job_reaches_the_worker_through_its_heartbeat(engine, queue, t0):
    submit(engine, "g")
    claimed = queue.claim("w", now=t0)
    before = queue.heartbeat(claimed.id, claimed.attempt_id, now=t0 + 1, worker_id=claimed.worker_id)
    assert before.ok and not before.cancel
    assert cancel_job(engine, claimed.id) == "cancel_requested"
    assert job(engine, claimed.id)["state"] == "running"
    reply = queue.heartbeat(claimed.id, claimed.attempt_id, now=t0 + 2, worker_id=claimed.worker_id)
    assert reply.ok and reply.cancel
    done = queue.finish(claimed.id, claimed.attempt_id, "cancelled", now=t0 + 3, worker_id=claimed.worker_id)
    assert done.ok and done.state == "cancelled"
    assert job(engine, claimed.id)["state"] == "cancelled"
    assert [a["outcome"] for a in attempts(engine, claimed.id)] == ["cancelled"]


def test_cancel_requested_job_that_errors_is_cancelled_not_retried(engine, queue, t0):
    submit(engine, "g", max_attempts=5)
    claimed = queue.claim("w", now=t0)
    cancel_job(engine, claimed.id)
    assert queue.finish(claimed.id, claimed.attempt_id, "error", error="stopped", now=t0 + 1,
                        worker_id=claimed.worker_id).state == "cancelled"
    assert queue.claim("w", now=t0 + 10_000) is None


def test_cancel_requested_job_whose_lease_expires_is_cancelled(engine, queue, t0):
    submit(engine, "g")
    claimed = queue.claim("w", now=t0)
    cancel_job(engine, claimed.id)
    assert queue.claim("other", now=t0 + LEASE + 1) is None
    row = job(engine, claimed.id)
    assert row["state"] == "cancelled" and row["attempt_id"] is None
    assert [a["outcome"] for a in attempts(engine, claimed.id)] == ["lost"]
    stale = queue.heartbeat(claimed.id, claimed.attempt_id, now=t0 + LEASE + 2, worker_id=claimed.worker_id)
    assert not stale.ok and stale.stop


def test_cancel_grid(engine, queue, t0):
    grid = submit(engine, "g", axes={"value": [1.0, 2.0, 3.0]})
    other = submit(engine, "other")
    running = queue.claim("w", now=t0)
    assert running.grid_id == grid.grid_id
    assert cancel_grid(engine, "g") == "cancelled"
    ids = job_ids(engine, grid.grid_id)
    assert [job(engine, i)["state"] for i in ids] == ["running", "cancelled", "cancelled"]
    assert queue.heartbeat(running.id, running.attempt_id, now=t0 + 1, worker_id=running.worker_id).cancel
    got = queue.claim("w", now=t0 + 1)
    assert got.grid_id == other.grid_id
    assert queue.claim("w", now=t0 + 1) is None
    assert queue.finish(running.id, running.attempt_id, "cancelled", now=t0 + 2,
                        worker_id=running.worker_id).state == "cancelled"
    summary = reports.grid_summary(engine, "g")
    assert summary["state"] == "cancelled"
    assert summary["counts"]["cancelled"] == 3 and summary["progress"] == 1.0
    assert job(engine, got.id)["state"] == "running"  # the other grid is untouched


def test_retry_failed_job_gets_fresh_budgets(engine, queue, t0):
    submit(engine, "g", max_attempts=2)
    now = t0
    for _ in range(2):
        claimed = queue.claim("w", now=now)
        queue.finish(claimed.id, claimed.attempt_id, "error", error="boom", now=now, worker_id=claimed.worker_id)
        now += 1000
    assert job(engine, claimed.id)["state"] == "failed"
    assert queue.claim("w", now=now) is None
    assert retry_job(engine, claimed.id) == "queued"
    row = job(engine, claimed.id)
    assert row["state"] == "queued" and row["errors"] == 0 and row["losses"] == 0 and row["finished_at"] is None
    # the whole error budget again: the first error is retried, the second fails
    claimed = queue.claim("w", now=now)
    assert claimed is not None and claimed.attempt == 3
    assert queue.finish(claimed.id, claimed.attempt_id, "error", error="boom", now=now,
                        worker_id=claimed.worker_id).state == "queued"
    claimed = queue.claim("w", now=now + 1000)
    assert queue.finish(claimed.id, claimed.attempt_id, "succeeded", now=now + 1000,
                        worker_id=claimed.worker_id).state == "succeeded"
    assert "retry" in [e["kind"] for e in reports.job_events(engine, claimed.id)]


def test_retry_resets_the_loss_and_preemption_budgets(engine, t0):
    queue = Queue(engine, RetryPolicy(lease_seconds=LEASE, max_lost=1, max_preemptions=1))
    grid = submit(engine, "g", axes={"value": [1.0, 2.0]})
    lost_id, preempted_id = job_ids(engine, grid.grid_id)
    a = queue.claim("w", now=t0)
    assert a.id == lost_id
    b = queue.claim("w", now=t0)
    queue.finish(b.id, b.attempt_id, "preempted", now=t0, worker_id=b.worker_id)
    b = queue.claim("w", now=t0)
    assert queue.finish(b.id, b.attempt_id, "preempted", now=t0, worker_id=b.worker_id).state == "failed"
    queue.requeue_expired(now=t0 + LEASE + 1)
    assert job(engine, lost_id)["state"] == "failed"
    for job_id in (lost_id, preempted_id):
        retry_job(engine, job_id)
        row = job(engine, job_id)
        assert (row["state"], row["losses"], row["preemptions"]) == ("queued", 0, 0)
    # one more preemption is within the fresh budget
    b = queue.claim("w", now=t0 + 100)
    b = b if b.id == preempted_id else queue.claim("w", now=t0 + 100)
    assert b.id == preempted_id
    assert queue.finish(b.id, b.attempt_id, "preempted", now=t0 + 100, worker_id=b.worker_id).state == "queued"


def test_retry_rejects_jobs_that_have_not_ended(engine, queue, t0):
    grid = submit(engine, "g", axes={"value": [1.0, 2.0]})
    queued_id = job_ids(engine, grid.grid_id)[1]
    running = queue.claim("w", now=t0)
    with pytest.raises(Conflict):
        retry_job(engine, running.id)
    with pytest.raises(Conflict):
        retry_job(engine, queued_id)
    queue.finish(running.id, running.attempt_id, "succeeded", now=t0, worker_id=running.worker_id)
    with pytest.raises(Conflict):
        retry_job(engine, running.id)
    with pytest.raises(NotFound):
        retry_job(engine, 99999)


def test_retry_in_a_cancelled_grid_is_a_conflict_until_resumed(engine, queue, t0):
    grid = submit(engine, "g")
    [job_id] = job_ids(engine, grid.grid_id)
    cancel_grid(engine, "g")
    assert job(engine, job_id)["state"] == "cancelled"
    with pytest.raises(Conflict, match="cancelled grid"):
        retry_job(engine, job_id)
    assert job(engine, job_id)["state"] == "cancelled"
    resume_grid(engine, "g")
    assert queue.claim("w", now=t0) is None  # resuming requeues nothing by itself
    assert retry_job(engine, job_id) == "queued"
    assert queue.claim("w", now=t0).id == job_id


# ---- read models ------------------------------------------------------------------------------------
def _run_all(queue, now, results):
    """Claim every job and finish it with results[value] (None: leave it running; 'error': fail it)."""
    while (claimed := queue.claim("w", now=now)) is not None:
        outcome = results.get(claimed.config.get("value"))
        if outcome is None:
            queue.heartbeat(claimed.id, claimed.attempt_id, progress=(1, 4), now=now, worker_id=claimed.worker_id)
        elif outcome == "error":
            queue.finish(claimed.id, claimed.attempt_id, "error", error="bad", now=now, worker_id=claimed.worker_id)
        else:
            queue.finish(claimed.id, claimed.attempt_id, "succeeded", result=outcome, now=now,
                         worker_id=claimed.worker_id)


def test_grid_summary_counts_progress_and_best_min(engine, queue, t0):
    submit(engine, "g", axes={"value": [3.0, 1.0, 2.0, 5.0, 4.0]}, objective="min:loss", max_attempts=1)
    _run_all(queue, t0, {3.0: {"loss": 3.0}, 1.0: {"loss": 1.0}, 2.0: {"loss": 2.0}, 5.0: "error", 4.0: None})
    s = reports.grid_summary(engine, "g")
    assert s["total"] == 5
    assert s["counts"] == {"queued": 0, "running": 1, "succeeded": 3, "failed": 1, "cancelled": 0, "pruned": 0}
    assert s["progress"] == pytest.approx((4 + 0.25) / 5)
    assert s["best"]["metric"] == "loss" and s["best"]["value"] == 1.0
    assert s["best"]["config"] == {"value": 1.0} and s["best"]["seed"] == 0
    assert s["objective"] == "min:loss" and s["trainer"] == "noop" and s["state"] == "active"
    assert s["spec"]["axes"] == {"value": [3.0, 1.0, 2.0, 5.0, 4.0]}
    assert reports.grid_summary(engine, s["id"])["name"] == "g"
    with pytest.raises(NotFound):
        reports.grid_summary(engine, "missing")


def test_grid_summary_best_max_ignores_missing_and_non_numeric(engine, queue, t0):
    submit(engine, "g", axes={"value": [1.0, 2.0, 3.0, 4.0]}, objective="max:acc")
    _run_all(queue, t0, {1.0: {"acc": 0.7}, 2.0: {"acc": 0.9}, 3.0: {"loss": 1.0}, 4.0: {"acc": "high"}})
    s = reports.grid_summary(engine, "g")
    assert s["best"]["value"] == 0.9 and s["best"]["config"] == {"value": 2.0}
    assert s["progress"] == 1.0


def test_grid_summary_without_objective_or_results(engine, queue, t0):
    submit(engine, "g", axes={"value": [1.0, 2.0]})
    s = reports.grid_summary(engine, "g")
    assert s["best"] is None and s["progress"] == 0.0 and s["counts"]["queued"] == 2
    assert [g["name"] for g in reports.list_grids(engine)] == ["g"]


def test_grid_results_sorted_by_objective(engine, queue, t0):
    submit(engine, "lo", axes={"value": [3.0, 1.0, 2.0, 9.0]}, objective="min:loss")
    _run_all(queue, t0, {3.0: {"loss": 3.0}, 1.0: {"loss": 1.0}, 2.0: {"loss": 2.0}, 9.0: None})
    rows = reports.grid_results(engine, "lo")
    assert [r["config"]["value"] for r in rows] == [1.0, 2.0, 3.0, 9.0]  # unscored last
    assert [r["state"] for r in rows] == ["succeeded"] * 3 + ["running"]

    submit(engine, "hi", axes={"value": [1.0, 2.0, 3.0]}, objective="max:acc")
    _run_all(queue, t0, {1.0: {"acc": 0.5}, 2.0: {"acc": 0.9}, 3.0: {"acc": 0.1}})
    assert [r["result"]["acc"] for r in reports.grid_results(engine, "hi")] == [0.9, 0.5, 0.1]


def test_grid_results_without_objective_keep_job_order(engine, queue, t0):
    grid = submit(engine, "g", axes={"value": [3.0, 1.0, 2.0]})
    _run_all(queue, t0, {3.0: {"loss": 3.0}, 1.0: {"loss": 1.0}, 2.0: {"loss": 2.0}})
    assert [r["job_id"] for r in reports.grid_results(engine, "g")] == job_ids(engine, grid.grid_id)


def test_results_table_flattens_config_and_result(engine, queue, t0):
    submit(engine, "g", trainer="sleep", config={"seconds": 0.0}, axes={"seconds": [0.0, 0.01]}, seeds=[1, 2],
           objective="min:loss")
    done = 0
    while (claimed := queue.claim("w", now=t0)) is not None:
        result = {"loss": float(done), "curve": [1, 2], "extra": {"acc": 0.5}} if done % 2 == 0 else {"loss": 9.0}
        queue.finish(claimed.id, claimed.attempt_id, "succeeded", result=result, now=t0, worker_id=claimed.worker_id)
        done += 1
    columns, rows = reports.results_table(reports.grid_results(engine, "g"))
    assert columns[:4] == ["job_id", "state", "seed", "attempts"]
    assert "config.seconds" in columns
    assert {"result.loss", "result.curve", "result.extra.acc"} <= set(columns)
    assert len(rows) == 4
    first = rows[0]
    assert first["result.loss"] == 0.0 and first["result.curve"] == "[1, 2]" and first["result.extra.acc"] == 0.5
    assert rows[-1]["result.loss"] == 9.0 and "result.curve" not in rows[-1]
    assert {(r["config.seconds"], r["seed"]) for r in rows} == {(0.0, 1), (0.0, 2), (0.01, 1), (0.01, 2)}


def test_results_table_nested_config():
    columns, rows = reports.results_table(
        [{"job_id": 1, "state": "succeeded", "seed": 0, "attempts": 1,
          "config": {"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "n": 2}, "result": None}]
    )
    assert columns == ["job_id", "state", "seed", "attempts", "config.optim.lr", "config.optim.betas", "config.n"]
    assert rows[0]["config.optim.betas"] == "[0.9, 0.99]"


def test_job_detail_lists_attempts(engine, queue, t0):
    submit(engine, "g")
    a = queue.claim("a", now=t0)
    b = queue.claim("b", now=t0 + LEASE + 1)
    queue.finish(b.id, b.attempt_id, "succeeded", result={"loss": 0.5}, now=t0 + LEASE + 2, worker_id=b.worker_id)
    detail = reports.job_detail(engine, a.id)
    assert detail["grid"] == "g" and detail["state"] == "succeeded" and detail["result"] == {"loss": 0.5}
    assert [(x["id"], x["outcome"]) for x in detail["attempt_history"]] == [(a.attempt_id, "lost"), (b.attempt_id, "succeeded")]
    with pytest.raises(NotFound):
        reports.job_detail(engine, 99999)


def test_worker_registration_and_state(engine, queue, t0):
    worker = queue.register_worker("w1", "host-1", ["noop"], gpus=[{"name": "H100"}], resources={"gpus": 1})
    assert queue.worker_seen(worker)
    assert not queue.worker_seen("unknown-worker")
    submit(engine, "g")
    claimed = queue.claim(worker, now=t0)
    [w] = reports.list_workers(engine)
    assert (w["state"], w["current_job_id"], w["trainers"], w["gpus"]) == ("busy", claimed.id, ["noop"], [{"name": "H100"}])
    queue.finish(claimed.id, claimed.attempt_id, "succeeded", now=t0 + 1, worker_id=claimed.worker_id)
    [w] = reports.list_workers(engine)
    assert (w["state"], w["current_job_id"]) == ("idle", None)


# ---- the hot path's shortcuts (bench/README.md): throttled expiry scan, one-statement Postgres writes -----
def expire_lease(engine, job_id):
    """The worker went silent and its lease ran out (time moved on in the database, not by sleeping)."""
    with engine.begin() as conn:
        conn.execute(update(t.jobs).where(t.jobs.c.id == job_id).values(lease_expires_at=time.time() - 1))


def test_claim_without_now_handles_an_expired_lease_before_answering_none(engine, policy):
    submit(engine, "g")
    q = Queue(engine, policy, expiry_scan_seconds=3600.0)  # the periodic scan is never due again in this test
    a = q.claim("a")
    expire_lease(engine, a.id)
    b = q.claim("b")  # nothing else is runnable: the claim scans before it says None
    assert b is not None and (b.id, b.attempt) == (a.id, 2)
    assert not q.finish(a.id, a.attempt_id, "succeeded", worker_id=a.worker_id).ok  # still fenced
    assert q.finish(b.id, b.attempt_id, "succeeded", worker_id=b.worker_id).ok
    assert {r["id"]: r["outcome"] for r in attempts(engine, a.id)} == {a.attempt_id: "lost", b.attempt_id: "succeeded"}
    assert q.claim("b") is None


def test_claim_without_now_scans_for_expired_leases_only_when_due(engine, policy):
    first, second, _ = job_ids(engine, submit(engine, "g", axes={"value": [1.0, 2.0, 3.0]}).grid_id)
    throttled = Queue(engine, policy, expiry_scan_seconds=3600.0)
    a = throttled.claim("a")  # a Queue's first claim scans
    assert a.id == first
    expire_lease(engine, first)
    # Runnable work is left, and the scan is not due: the expired lease waits, the next job goes out.
    assert throttled.claim("b").id == second
    assert job(engine, first)["attempt_id"] == a.attempt_id
    due = Queue(engine, policy, expiry_scan_seconds=0.0)  # every claim is due: the scan runs first
    c = due.claim("c")
    assert (c.id, c.attempt) == (first, 2)  # requeued (first loss: no backoff) and older than the third job
    assert job(engine, first)["losses"] == 1


def test_a_worker_shows_busy_while_a_job_holds_its_lease_and_idle_after(engine, queue, t0):
    """GET /workers derives state and current job from the jobs a worker runs: no claim writes them."""
    worker = queue.register_worker("w", "host", ["noop"])
    assert queue.claim(worker, now=t0) is None
    [w] = reports.list_workers(engine)
    assert (w["state"], w["current_job_id"]) == ("idle", None)
    submit(engine, "g")
    claimed = queue.claim(worker, now=t0)
    assert queue.claim(worker, now=t0 + 1) is None  # asking again gives nothing up: the job keeps its lease
    [w] = reports.list_workers(engine)
    assert (w["state"], w["current_job_id"]) == ("busy", claimed.id)
    assert job(engine, claimed.id)["state"] == "running"
    with engine.connect() as conn:  # the row is as registered
        assert conn.execute(select(t.workers.c.state, t.workers.c.current_job_id)).one() == ("idle", None)
    assert queue.finish(claimed.id, claimed.attempt_id, "succeeded", now=t0 + 2, worker_id=worker).ok
    [w] = reports.list_workers(engine)
    assert (w["state"], w["current_job_id"]) == ("idle", None)


@pytest.mark.parametrize("outcome", ["succeeded", "error", "preempted", "cancelled"])
def test_finish_ends_the_attempt_logs_an_event_and_frees_the_worker(engine, queue, t0, outcome):
    submit(engine, "g", config={"value": 1.0})
    worker = queue.register_worker("w", "host", ["noop"])
    claimed = queue.claim(worker, code_rev="abc", now=t0)
    error = None if outcome == "succeeded" else f"{outcome} here"
    reply = queue.finish(claimed.id, claimed.attempt_id, outcome, result={"loss": 1.0}, error=error, now=t0 + 1,
                         worker_id=claimed.worker_id)
    assert reply.ok and reply.state == {"succeeded": "succeeded", "error": "queued", "preempted": "queued",
                                        "cancelled": "cancelled"}[outcome]
    [attempt] = attempts(engine, claimed.id)
    assert (attempt["id"], attempt["outcome"], attempt["ended_at"], attempt["error"], attempt["worker_id"],
            attempt["code_rev"]) == (claimed.attempt_id, outcome, t0 + 1, error, worker, "abc")
    row = job(engine, claimed.id)
    assert (row["state"], row["attempt_id"], row["worker_id"], row["lease_expires_at"]) == (reply.state, None, None, None)
    assert row["result"] == ({"loss": 1.0} if outcome == "succeeded" else None)
    events = [(e["kind"], e["attempt_id"]) for e in reports.job_events(engine, claimed.id)]
    assert events == [(outcome, claimed.attempt_id)]
    [w] = reports.list_workers(engine)
    assert (w["state"], w["current_job_id"], w["last_seen_at"]) == ("idle", None, pytest.approx(t0 + 1))
    # the attempt is over: a second finish changes nothing
    assert not queue.finish(claimed.id, claimed.attempt_id, "succeeded", now=t0 + 2, worker_id=claimed.worker_id).ok
    assert len(reports.job_events(engine, claimed.id)) == 1 and job(engine, claimed.id)["state"] == reply.state


def test_heartbeat_without_progress_keeps_the_last_reported(engine, queue, t0):
    submit(engine, "g")
    claimed = queue.claim("w", now=t0)
    assert queue.heartbeat(claimed.id, claimed.attempt_id, step=7, progress=(7, 70), now=t0 + 1,
                           worker_id=claimed.worker_id).ok
    reply = queue.heartbeat(claimed.id, claimed.attempt_id, now=t0 + 2, worker_id=claimed.worker_id)
    assert reply.ok and reply.lease_expires_at == pytest.approx(t0 + 2 + LEASE)
    row = job(engine, claimed.id)
    assert (row["step"], row["progress_done"], row["progress_total"]) == (7, 7, 70)
    assert row["lease_expires_at"] == pytest.approx(t0 + 2 + LEASE)
    assert reports.job_metrics(engine, claimed.id) == []


def _write_once_after_the_restart(q, engine, operation: str, claimed, first: int, second: int) -> None:
    """Run `operation` once on a Queue whose connections the server has just closed; check it happened once."""
    if operation == "claim":
        again = q.claim("w")
        assert again is not None and again.id == second
        assert [(a["id"], a["outcome"]) for a in attempts(engine, second)] == [(again.attempt_id, "running")]
    elif operation == "heartbeat":
        assert q.heartbeat(claimed.id, claimed.attempt_id, step=3, worker_id=claimed.worker_id).ok
        assert job(engine, first)["step"] == 3
    else:
        assert q.finish(claimed.id, claimed.attempt_id, "succeeded", result={"loss": 1.0},
                        worker_id=claimed.worker_id).ok
        assert [e["kind"] for e in reports.job_events(engine, first)] == ["succeeded"]
        assert job(engine, first)["result"] == {"loss": 1.0}


# Postgres connections: no pre-ping round trip; a connection the server closed is replaced at checkout.
def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite has no server to lose
@pytest.mark.parametrize("operation", ["claim", "heartbeat", "finish"])
def test_a_pooled_connection_the_server_closed_is_replaced_and_the_write_runs_once(db_url, policy, operation):
    engine = make_engine(db_url, pool_size=1, max_overflow=0)  # one pooled connection: the one we kill
    try:
        q = Queue(engine, policy)
        first, second = job_ids(engine, submit(engine, "g", axes={"value": [1.0, 2.0]}).grid_id)
        claimed = q.claim("w")
        old_pid = _backend_pid(engine)
        admin = make_engine(db_url, poolclass=NullPool)
        with admin.connect() as conn:  # waits until the backend is gone, as after a Postgres restart
            assert conn.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": old_pid}).scalar_one()
        admin.dispose()

        _write_once_after_the_restart(q, engine, operation, claimed, first, second)
        assert _backend_pid(engine) != old_pid
    finally:
        engine.dispose()


def _other_backends(admin) -> set[int]:
    """The pids of the server processes serving this database, except the admin connection's own."""
    return set(admin.execute(text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )).scalars())


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # SQLite has no server to lose
@pytest.mark.parametrize("operation", ["claim", "heartbeat", "finish"])
def test_the_queues_raw_connection_the_server_closed_is_replaced_and_the_write_runs_once(db_url, policy, operation):
    """The hot path runs on the Queue's own psycopg connection: a server restart ends it (and the pool's)
    while idle; the next statement goes out on a new connection, once. dispose() closes them all."""
    engine = make_engine(db_url)
    admin_engine = make_engine(db_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        q = Queue(engine, policy)
        first, second = job_ids(engine, submit(engine, "g", axes={"value": [1.0, 2.0]}).grid_id)
        claimed = q.claim("w")  # opens the raw connection, which stays open and idle
        with admin_engine.connect() as admin:  # as a restart: every backend of the database ends
            old = _other_backends(admin)
            assert len(old) == 2  # the pool's and the Queue's
            for pid in old:
                assert admin.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}).scalar_one()

        _write_once_after_the_restart(q, engine, operation, claimed, first, second)

        with admin_engine.connect() as admin:
            assert _other_backends(admin) and not _other_backends(admin) & old
            engine.dispose()  # closes the Queue's connections too: nothing is left to block DROP DATABASE
            deadline = time.monotonic() + 10.0
            while _other_backends(admin) and time.monotonic() < deadline:
                time.sleep(0.02)  # a closed connection's backend exits just after the client hangs up
            assert _other_backends(admin) == set()
    finally:
        engine.dispose()
        admin_engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # synchronous_commit is a Postgres setting
def test_the_heartbeats_async_commit_does_not_outlive_the_heartbeat(db_url, policy):
    engine = make_engine(db_url)
    try:
        q = Queue(engine, policy)
        submit(engine, "g")
        claimed = q.claim("w")
        with engine.connect() as conn:
            before = conn.execute(text("SHOW synchronous_commit")).scalar_one()
        assert q.heartbeat(claimed.id, claimed.attempt_id, step=1, worker_id=claimed.worker_id).ok
        # The heartbeat ran on the Queue's one raw connection; its claims and finishes must stay synchronous.
        with q._autocommit.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == before
        q.close()
        assert q.heartbeat(claimed.id, claimed.attempt_id, step=2,
                           worker_id=claimed.worker_id).ok  # a closed Queue opens a new connection
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # ANALYZE is a no-op on SQLite
def test_a_big_submit_refreshes_the_planner_statistics_itself(db_url, engine):

    def manual_analyzes():
        with engine.connect() as conn:
            return conn.execute(text("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'jobs'")).scalar_one()

    before = manual_analyzes()
    submit(engine, "small", axes={"value": [1.0, 2.0]})
    assert manual_analyzes() == before
    submit(engine, "big", axes={"value": [float(i) for i in range(ANALYZE_AFTER_ROWS)]})
    assert manual_analyzes() == before + 1
    submit(engine, "big", axes={"value": [float(i) for i in range(ANALYZE_AFTER_ROWS)]})  # nothing new
    assert manual_analyzes() == before + 1
