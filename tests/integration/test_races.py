"""The two races people ask about (issue 8 item 5; docs/reliability.md), on SQLite and Postgres.

Time moves through the `now=` parameters, never by sleeping.
"""
from __future__ import annotations

import time

import pytest

from scheduler import reports
from scheduler.grids import cancel_job
from tests.integration.test_queue import LEASE, attempts, job, submit


@pytest.fixture
def t0():
    return time.time()


def test_a_cancel_requested_while_the_job_finishes_loses_to_success_and_is_shown(engine, queue, t0):
    submit(engine, "g")
    claimed = queue.claim("w", now=t0)
    assert reports.job_detail(engine, claimed.id)["cancel_requested"] is False
    assert cancel_job(engine, claimed.id) == "cancel_requested"
    detail = reports.job_detail(engine, claimed.id)  # what GET /jobs/{id} answers
    assert (detail["state"], detail["cancel_requested"]) == ("running", True)
    # the trainer had already returned: the worker reports success before its next heartbeat
    done = queue.finish(claimed.id, claimed.attempt_id, "succeeded", result={"loss": 0.5}, now=t0 + 1, worker_id=claimed.worker_id)
    assert done.ok and done.state == "succeeded"
    detail = reports.job_detail(engine, claimed.id)
    assert (detail["state"], detail["result"], detail["cancel_requested"]) == ("succeeded", {"loss": 0.5}, True)
    assert [a["outcome"] for a in detail["attempt_history"]] == ["succeeded"]


def test_a_heartbeat_or_finish_after_the_lease_expired_is_accepted_until_someone_claims(engine, queue, t0):
    submit(engine, "g", axes={"value": [1.0, 2.0]})
    first = queue.claim("a", now=t0)
    second = queue.claim("b", now=t0)
    late = t0 + LEASE + 10  # both leases are over, and no claim has scanned for expired ones yet
    assert queue.heartbeat(first.id, first.attempt_id, step=3, now=late, worker_id=first.worker_id).ok
    assert job(engine, first.id)["lease_expires_at"] == pytest.approx(late + LEASE)
    assert queue.finish(second.id, second.attempt_id, "succeeded", result={"loss": 1.0}, now=late, worker_id=second.worker_id).ok
    assert job(engine, second.id)["state"] == "succeeded"
    assert [a["outcome"] for a in attempts(engine, second.id)] == ["succeeded"]
    assert job(engine, first.id)["losses"] == 0
