"""An attempt's writes come only from the worker that claimed it (SQLite and Postgres, through Queue).

Worker B knows what GET /jobs shows about A's job (its id, attempt id and worker id) and tries every fenced
write with its own worker id: each is refused with stop, and nothing about the job changes. A then finishes
the job, which completes once. The API's side (the worker secret that proves the worker id) is in
tests/e2e/test_api_server.py.
"""
from __future__ import annotations

import time

from sqlalchemy import select

from common import schema as t
from scheduler import reports
from scheduler.grids import submit_grid
from scheduler.queue import OUTCOMES, Metric
from scheduler.spec import GridSpec
from worker.trainers import validate_config


def snapshot(engine) -> dict[str, list]:
    """Every row a fenced write could touch."""
    tables = {"jobs": t.jobs, "attempts": t.attempts, "metrics": t.metrics, "events": t.events, "workers": t.workers}
    with engine.connect() as conn:
        return {name: [dict(r) for r in conn.execute(select(table).order_by(*table.primary_key)).mappings()]
                for name, table in tables.items()}


def test_another_worker_cannot_write_for_an_attempt_it_does_not_hold(engine, queue):
    submit_grid(engine, GridSpec.model_validate({"name": "g", "trainer": "noop", "code_rev": "exp-1"}), validate_config)
    worker_a = queue.register_worker("a", "host-a", ["noop"])
    worker_b = queue.register_worker("b", "host-b", ["noop"])
    t0 = time.time()
    job = queue.claim(worker_a, can_pin_code=True, now=t0)
    assert job is not None and job.worker_id == worker_a
    assert queue.heartbeat(job.id, job.attempt_id, step=1, metrics=[Metric(1, {"loss": 2.0}, t0)], now=t0,
                           worker_id=worker_a).ok
    before = snapshot(engine)

    later = t0 + 1
    refused = {
        "heartbeat": queue.heartbeat(job.id, job.attempt_id, step=9, progress=(9, 10),
                                     metrics=[Metric(9, {"loss": 0.0}, later)], now=later, worker_id=worker_b),
        "checkpoint": queue.set_checkpoint(job.id, job.attempt_id, {"uri": "local:/elsewhere", "step": 9},
                                           worker_id=worker_b),
        "events": queue.add_events(job.id, job.attempt_id, [("log", "not mine")], now=later, worker_id=worker_b),
        "code_rev": queue.record_code_rev(job.id, job.attempt_id, "b" * 40, now=later, worker_id=worker_b),
        **{f"finish {outcome}": queue.finish(job.id, job.attempt_id, outcome, result={"loss": 0.0}, error="x",
                                             now=later, worker_id=worker_b)
           for outcome in OUTCOMES},  # both Postgres finish paths: one statement, and locked read + statement
    }
    for write, reply in refused.items():
        assert (reply.ok, reply.stop) == (False, True), write
        assert worker_b in reply.reason and job.attempt_id in reply.reason, (write, reply.reason)
    assert snapshot(engine) == before  # the job, its attempt, metrics, events and both workers: untouched

    # A still holds the job and finishes it, once.
    assert queue.heartbeat(job.id, job.attempt_id, step=2, now=later, worker_id=worker_a).ok
    done = queue.finish(job.id, job.attempt_id, "succeeded", result={"loss": 1.0}, now=later, worker_id=worker_a)
    assert done.ok and done.state == "succeeded"
    assert not queue.finish(job.id, job.attempt_id, "succeeded", now=later, worker_id=worker_a).ok
    # The late final-checkpoint pointer of a succeeded job: from A's registration only.
    assert not queue.set_checkpoint(job.id, job.attempt_id, {"uri": "local:/b", "step": 5}, worker_id=worker_b).ok
    assert queue.set_checkpoint(job.id, job.attempt_id, {"uri": "local:/a", "step": 2}, worker_id=worker_a).ok
    after = snapshot(engine)
    [row] = after["jobs"]
    assert (row["state"], row["result"], row["checkpoint"]["uri"], row["step"]) == ("succeeded", {"loss": 1.0},
                                                                                      "local:/a", 2)
    [attempt] = after["attempts"]
    assert (attempt["worker_id"], attempt["outcome"], attempt["code_rev"]) == (worker_a, "succeeded", "exp-1")
    assert after["events"] == []  # the attempt row is its end event (ENDS_IN_ATTEMPT_ROW):
    assert [e["kind"] for e in reports.job_events(engine, job.id)] == ["succeeded"]
    assert [(m["step"], m["attempt_id"]) for m in after["metrics"]] == [(1, job.attempt_id)]


def test_the_holder_of_a_job_cannot_write_for_another_workers_job(engine, queue):
    """Two running jobs, one per worker: each worker's writes reach only its own job."""
    submit_grid(engine, GridSpec.model_validate({"name": "g2", "trainer": "noop", "axes": {"value": [1.0, 2.0]}}),
                validate_config)
    worker_a = queue.register_worker("a", "h", ["noop"])
    worker_b = queue.register_worker("b", "h", ["noop"])
    job_a, job_b = queue.claim(worker_a), queue.claim(worker_b)
    assert {job_a.worker_id, job_b.worker_id} == {worker_a, worker_b}
    before = snapshot(engine)
    assert not queue.finish(job_a.id, job_a.attempt_id, "succeeded", worker_id=worker_b).ok
    assert not queue.finish(job_b.id, job_b.attempt_id, "error", error="x", worker_id=worker_a).ok
    assert not queue.add_events(job_a.id, job_a.attempt_id, [("log", "x")], worker_id=worker_b).ok
    assert snapshot(engine) == before
    assert queue.finish(job_a.id, job_a.attempt_id, "succeeded", worker_id=worker_a).state == "succeeded"
    assert queue.finish(job_b.id, job_b.attempt_id, "succeeded", worker_id=worker_b).state == "succeeded"
