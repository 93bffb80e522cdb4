"""A lost attempt regains its job (issue 8 item 6), on SQLite and Postgres: after its lease expired and a
claim's expiry scan requeued the job as lost, a heartbeat, checkpoint pointer or finish from that attempt
takes the job back, unless somebody claimed it since or it ended (cancelled, failed, succeeded).

Time moves through the `now=` parameters, never by sleeping.
"""
from __future__ import annotations

import threading
import time

import pytest

from common import schema as t
from scheduler import reports
from scheduler.grids import cancel_grid, cancel_job
from scheduler.policy import RetryPolicy
from scheduler.queue import Metric, Queue
from tests.integration.test_queue import LEASE, attempts, count, job, submit


@pytest.fixture
def t0():
    return time.time()


def lost(engine, queue, t0, name="g"):
    """One job claimed by worker a, whose lease expired and was requeued as lost: (claimed, when)."""
    submit(engine, name)
    queue.register_worker("a", "host-a", ["noop"], worker_id="a")
    claimed = queue.claim("a", now=t0)
    when = t0 + LEASE + 1
    assert queue.requeue_expired(now=when) == 1
    row = job(engine, claimed.id)
    assert (row["state"], row["attempt_id"], row["losses"]) == ("queued", None, 1)
    return claimed, when


def test_a_heartbeat_regains_a_job_requeued_as_lost_that_nobody_claimed(engine, queue, t0):
    a, when = lost(engine, queue, t0)
    reply = queue.heartbeat(a.id, a.attempt_id, step=7, metrics=[Metric(7, {"loss": 0.5}, time=when)], now=when + 1, worker_id=a.worker_id)
    assert reply.ok and not reply.stop and reply.lease_expires_at == pytest.approx(when + 1 + LEASE)
    row = job(engine, a.id)
    assert (row["state"], row["attempt_id"], row["worker_id"]) == ("running", a.attempt_id, "a")
    assert row["losses"] == 0 and row["attempts"] == 1 and row["step"] == 7
    assert row["lease_expires_at"] == pytest.approx(when + 1 + LEASE)
    [attempt] = attempts(engine, a.id)
    assert (attempt["outcome"], attempt["ended_at"], attempt["error"]) == ("running", None, None)
    assert count(engine, t.metrics, t.metrics.c.attempt_id == a.attempt_id) == 1
    regained = [e for e in reports.job_events(engine, a.id) if e["kind"] == "regained"]
    assert len(regained) == 1 and "without heartbeats" in regained[0]["message"]
    assert f"after {LEASE + 2:.0f} s" in regained[0]["message"]  # the worker was last seen at the claim
    worker = next(w for w in reports.list_workers(engine) if w["id"] == "a")
    assert (worker["state"], worker["current_job_id"]) == ("busy", a.id)
    # the job is the attempt's again: nobody else can claim it, and a second heartbeat is a plain one
    assert queue.claim("b", now=when + 2) is None
    assert queue.heartbeat(a.id, a.attempt_id, now=when + 3, worker_id=a.worker_id).ok
    assert count(engine, t.events, t.events.c.kind == "regained") == 1


def test_another_workers_write_never_regains_a_job_for_its_owner(engine, queue, t0):
    a, when = lost(engine, queue, t0)
    queue.register_worker("b", "host-b", ["noop"], worker_id="b")
    for reply in (queue.heartbeat(a.id, a.attempt_id, step=9, now=when + 1, worker_id="b"),
                  queue.set_checkpoint(a.id, a.attempt_id, {"uri": "local:/b", "step": 9}, worker_id="b"),
                  queue.finish(a.id, a.attempt_id, "succeeded", result={"loss": 9.0}, now=when + 1, worker_id="b")):
        assert not reply.ok and reply.stop
    row = job(engine, a.id)
    assert (row["state"], row["attempt_id"], row["losses"], row["checkpoint"]) == ("queued", None, 1, None)
    assert count(engine, t.events, t.events.c.kind == "regained") == 0
    assert queue.heartbeat(a.id, a.attempt_id, now=when + 2, worker_id="a").ok  # its own worker still can


def test_a_regained_attempt_records_its_checkpoint_and_finishes_once(engine, queue, t0):
    a, when = lost(engine, queue, t0)
    pointer = {"uri": "local:/ckpt-9", "step": 9}
    assert queue.set_checkpoint(a.id, a.attempt_id, pointer, worker_id=a.worker_id).ok  # the first word after the outage regains
    assert job(engine, a.id)["checkpoint"] == pointer
    done = queue.finish(a.id, a.attempt_id, "succeeded", result={"loss": 0.1}, now=when + 2, worker_id=a.worker_id)
    assert done.ok and done.state == "succeeded"
    row = job(engine, a.id)
    assert (row["state"], row["result"], row["losses"], row["attempts"]) == ("succeeded", {"loss": 0.1}, 0, 1)
    assert [x["outcome"] for x in attempts(engine, a.id)] == ["succeeded"]
    assert queue.claim("b", now=when + 10 * LEASE) is None


@pytest.mark.parametrize("outcome", ["succeeded", "error", "preempted"])
def test_a_finish_is_the_first_word_after_the_outage(engine, queue, t0, outcome):
    a, when = lost(engine, queue, t0)
    done = queue.finish(a.id, a.attempt_id, outcome, result={"loss": 0.1}, error="boom", now=when + 2, worker_id=a.worker_id)
    assert done.ok and done.state == ("succeeded" if outcome == "succeeded" else "queued")
    row = job(engine, a.id)
    assert row["losses"] == 0 and row["errors"] == (1 if outcome == "error" else 0)
    assert [x["outcome"] for x in attempts(engine, a.id)] == [outcome]


def test_a_claim_that_came_first_wins_and_the_old_attempt_is_told_to_stop(engine, queue, t0):
    a, when = lost(engine, queue, t0)
    b = queue.claim("b", now=when)
    assert b is not None and b.id == a.id
    for reply in (queue.heartbeat(a.id, a.attempt_id, step=9, metrics=[Metric(9, {"loss": 9.0})], now=when + 1, worker_id=a.worker_id),
                  queue.set_checkpoint(a.id, a.attempt_id, {"uri": "local:/stale", "step": 9}, worker_id=a.worker_id),
                  queue.finish(a.id, a.attempt_id, "succeeded", result={"loss": 9.0}, now=when + 1, worker_id=a.worker_id)):
        assert (reply.ok, reply.stop) == (False, True)
    row = job(engine, a.id)
    assert (row["state"], row["attempt_id"], row["losses"], row["checkpoint"]) == ("running", b.attempt_id, 1, None)
    assert {x["id"]: x["outcome"] for x in attempts(engine, a.id)} == {a.attempt_id: "lost", b.attempt_id: "running"}
    assert count(engine, t.metrics, t.metrics.c.attempt_id == a.attempt_id) == 0
    assert count(engine, t.events, t.events.c.kind == "regained") == 0


def test_an_older_lost_attempt_cannot_regain_after_a_newer_one_ran(engine, queue, t0):
    a, when = lost(engine, queue, t0)
    b = queue.claim("b", now=when)
    assert queue.finish(b.id, b.attempt_id, "preempted", now=when + 1, worker_id=b.worker_id).state == "queued"  # queued again
    assert not queue.heartbeat(a.id, a.attempt_id, now=when + 2, worker_id=a.worker_id).ok
    assert not queue.heartbeat(b.id, b.attempt_id, now=when + 2, worker_id=b.worker_id).ok  # preempted is no lost lease
    row = job(engine, a.id)
    assert (row["state"], row["attempt_id"], row["losses"]) == ("queued", None, 1)


def cancel_requested_then_expired(engine, queue, t0):
    submit(engine, "g")
    a = queue.claim("a", now=t0)
    cancel_job(engine, a.id)
    queue.requeue_expired(now=t0 + LEASE + 1)
    return a


def cancelled_while_queued(engine, queue, t0):
    a, _ = lost(engine, queue, t0)
    assert cancel_job(engine, a.id) == "cancelled"
    return a


def grid_cancelled_while_queued(engine, queue, t0):
    a, _ = lost(engine, queue, t0)
    cancel_grid(engine, a.grid_id)
    return a


def failed_after_its_last_loss(engine, queue, t0):
    submit(engine, "g")
    queue = Queue(engine, RetryPolicy(lease_seconds=LEASE, max_lost=1))
    a = queue.claim("a", now=t0)
    queue.requeue_expired(now=t0 + LEASE + 1)
    return a


def succeeded_by_another(engine, queue, t0):
    a, when = lost(engine, queue, t0)
    b = queue.claim("b", now=when)
    assert queue.finish(b.id, b.attempt_id, "succeeded", result={"loss": 1.0}, now=when + 1, worker_id=b.worker_id).ok
    return a


@pytest.mark.parametrize("ended", [cancel_requested_then_expired, cancelled_while_queued, grid_cancelled_while_queued,
                                   failed_after_its_last_loss, succeeded_by_another])
def test_an_ended_job_is_not_regained(engine, queue, t0, ended):
    a = ended(engine, queue, t0)
    before = job(engine, a.id)
    assert before["state"] in ("cancelled", "failed", "succeeded")
    later = t0 + 3 * LEASE
    for reply in (queue.heartbeat(a.id, a.attempt_id, step=5, now=later, worker_id=a.worker_id),
                  queue.set_checkpoint(a.id, a.attempt_id, {"uri": "local:/late", "step": 5}, worker_id=a.worker_id),
                  queue.finish(a.id, a.attempt_id, "succeeded", result={"loss": 9.0}, now=later, worker_id=a.worker_id)):
        assert (reply.ok, reply.stop) == (False, True)
    after = job(engine, a.id)
    assert dict(after) == dict(before)
    assert next(x for x in attempts(engine, a.id) if x["id"] == a.attempt_id)["outcome"] == "lost"
    assert count(engine, t.events, t.events.c.kind == "regained") == 0


def test_regains_and_claims_racing_for_the_same_jobs_never_both_win(engine, policy, t0):
    jobs = 20
    submit(engine, "g", axes={"value": [float(i) for i in range(jobs)]})
    first = Queue(engine, policy)
    lost_attempts = [first.claim("a", now=t0) for _ in range(jobs)]
    when = t0 + LEASE + 1
    assert first.requeue_expired(now=when) == jobs
    claimer, regainer = Queue(engine, policy), Queue(engine, policy)
    start = threading.Barrier(2)
    claimed: list[int] = []
    regained: list[int] = []

    def claim_all():
        start.wait()
        while (claim := claimer.claim("b", now=when + 1)) is not None:
            claimed.append(claim.id)

    def regain_all():
        start.wait()
        for a in reversed(lost_attempts):  # from the other end of the queue, so the two meet in the middle
            if regainer.heartbeat(a.id, a.attempt_id, now=when + 1, worker_id=a.worker_id).ok:
                regained.append(a.id)

    threads = [threading.Thread(target=claim_all), threading.Thread(target=regain_all)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for queue in (first, claimer, regainer):
        queue.close()
    assert sorted(claimed + regained) == sorted(a.id for a in lost_attempts)  # every job won exactly once
    for a in lost_attempts:
        row = job(engine, a.id)
        running = [x for x in attempts(engine, a.id) if x["outcome"] == "running"]
        assert len(running) == 1 and row["state"] == "running" and row["attempt_id"] == running[0]["id"]
        if a.id in regained:
            assert (row["attempt_id"], row["losses"]) == (a.attempt_id, 0)
        else:
            assert row["attempt_id"] != a.attempt_id and row["losses"] == 1


def test_leases_that_expired_before_the_api_started_wait_out_its_grace(engine, policy, t0):
    submit(engine, "g", axes={"value": [1.0, 2.0]})
    a = Queue(engine, policy).claim("a", now=t0 - 2 * LEASE)  # its lease ended a lease ago: the API was down
    restarted = Queue(engine, policy, expiry_grace_seconds=3600.0)  # an API that just started
    assert restarted.claim("b", trainers=["sleep"]) is None  # a claim that scans for expired leases
    assert queue_state(engine, a.id) == ("running", a.attempt_id)
    assert restarted.heartbeat(a.id, a.attempt_id, worker_id=a.worker_id).ok  # the cut-off worker comes back and keeps its job
    assert Queue(engine, policy).claim("c", trainers=["sleep"], now=t0 + LEASE - 1) is None  # fresh again

    # leases that expire while this API runs (a's renewed one, x's) are requeued as usual, grace or not
    other = restarted.claim("x", now=time.time())
    assert other is not None and other.id != a.id
    assert restarted.requeue_expired(now=other.lease_expires_at + 1) == 2
    assert queue_state(engine, a.id) == queue_state(engine, other.id) == ("queued", None)


def queue_state(engine, job_id):
    row = job(engine, job_id)
    return row["state"], row["attempt_id"]
