"""The API is killed (SIGKILL) for twice the lease while a worker trains (issue 8 item 6): real `gridfleet
serve`, real workers, a sleep job that reports and checkpoints as it goes. The worker keeps training through
the outage; when the API is back on the same port and database it keeps the job if nobody claimed it (even
though the expired lease was requeued as lost meanwhile), or stops at once if another worker claimed it.
"""
from __future__ import annotations

import signal
import time

import pytest

from common.db import make_engine
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from tests.e2e.processes import LEASE_SECONDS, attempt_steps, job, ok, running_with, submit, worker_names

STEPS = 60
CONFIG = {"seconds": 24.0, "steps": STEPS, "checkpoint_every": 2}  # 0.4 s a step: the outage spans many
OUTAGE = 2 * LEASE_SECONDS


def kill_api(server) -> float:
    """SIGKILL the API process (no goodbye to anyone); returns when it went down."""
    server.proc.send(signal.SIGKILL)
    assert server.proc.wait(30) == -signal.SIGKILL
    return time.time()


def metrics_of(api, job_id: int, attempt_id: str) -> list[dict]:
    return [m for m in ok(api.get(f"/jobs/{job_id}/metrics"))["metrics"] if m["attempt_id"] == attempt_id]


def finished(api, job_id: int):
    detail = job(api, job_id)
    return detail if detail["state"] not in ("queued", "running") else None


def test_a_job_trains_through_an_api_outage_and_keeps_its_attempt(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    job_id = submit(api, "outage", CONFIG)
    worker = fleet.start_worker(server, "a")
    before = fleet.wait_for(lambda: running_with(api, job_id, 4, checkpointed=True), "the job to checkpoint step 4")
    attempt = before["attempt_id"]

    down_at = kill_api(server)
    # Any claim's expiry scan requeues the expired job as lost (here no other worker claims one): do what
    # that scan does, on the real database, once the lease is over.
    engine = make_engine(db_url)
    queue = Queue(engine, RetryPolicy(lease_seconds=LEASE_SECONDS))
    try:
        fleet.wait_for(lambda: queue.requeue_expired() == 1, "the lease to expire and the job to be requeued")
    finally:
        queue.close()
        engine.dispose()
    time.sleep(max(0.0, down_at + OUTAGE - time.time()))  # the outage lasts twice the lease
    server = fleet.restart_server(server)
    up_at = time.time()

    done = fleet.wait_for(lambda: finished(api, job_id), "the job to finish")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded" and done["result"] == {"loss": 1.0 / STEPS, "steps": STEPS}, context
    assert (done["attempts"], done["losses"], done["errors"]) == (1, 0, 0), context
    assert [(a["id"], a["outcome"]) for a in done["attempt_history"]] == [(attempt, "succeeded")], context
    events = ok(api.get(f"/jobs/{job_id}/events"))["events"]
    kinds = [e["kind"] for e in events]
    assert kinds.count("lost") == 1 and kinds.count("regained") == 1 and kinds.count("succeeded") == 1, kinds
    assert next(e for e in events if e["kind"] == "regained")["attempt_id"] == attempt
    assert done["checkpoint"]["step"] == STEPS, context  # the pointers held back by the outage were recorded

    # Nothing was trained twice: the one attempt reported every step once, also those of the outage.
    metrics = metrics_of(api, job_id, attempt)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)), context
    during = [m["step"] for m in metrics if down_at < m["time"] < up_at]
    assert during, f"no step was trained while the API was down{context}"
    assert worker.alive(), context
    worker.send(signal.SIGTERM)
    assert worker.wait(60) == 0, fleet.explain()
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_after_an_api_outage_a_worker_whose_job_was_claimed_stops_at_once(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    job_id = submit(api, "outage-claimed", CONFIG)
    first = fleet.start_worker(server, "a")
    before = fleet.wait_for(lambda: running_with(api, job_id, 4, checkpointed=True), "the job to checkpoint step 4")
    attempt = before["attempt_id"]
    second = fleet.start_worker(server, "b")
    fleet.wait_for(lambda: "b" in worker_names(api).values(), "worker b to register")

    down_at = kill_api(server)
    # Worker a stays cut off after the API is back (its agent is frozen; its job child trains on), so
    # worker b's claim gets the job once the lease and the API's grace after its start have passed.
    first.send(signal.SIGSTOP)
    try:
        time.sleep(max(0.0, down_at + OUTAGE - time.time()))
        server = fleet.restart_server(server)
        claimed = fleet.wait_for(lambda: (d := job(api, job_id))["attempt_id"] not in (None, attempt) and d,
                                 "worker b to claim the job")
    finally:
        first.send(signal.SIGCONT)
    assert worker_names(api)[claimed["worker_id"]] == "b"
    fleet.wait_for(lambda: not first.job_children(), "worker a to kill its job child")

    done = fleet.wait_for(lambda: finished(api, job_id), "the job to finish")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded" and done["result"] == {"loss": 1.0 / STEPS, "steps": STEPS}, context
    history = {a["id"]: a["outcome"] for a in done["attempt_history"]}
    assert history == {attempt: "lost", claimed["attempt_id"]: "succeeded"}, context
    assert (done["attempts"], done["losses"]) == (2, 1), context
    # Worker a wrote nothing after the outage began: no metrics, no pointer, no finish, no regain.
    assert all(m["time"] < down_at for m in metrics_of(api, job_id, attempt)), context
    kinds = [e["kind"] for e in ok(api.get(f"/jobs/{job_id}/events"))["events"]]
    assert kinds.count("regained") == 0 and kinds.count("succeeded") == 1, kinds
    resumed = attempt_steps(api, job_id, claimed["attempt_id"])
    assert resumed[0] > before["checkpoint"]["step"] and resumed == list(range(resumed[0], STEPS + 1)), context
    assert "is stale" in first.tail(200), context
    assert first.alive() and second.alive(), context
    for proc in (first, second):
        proc.send(signal.SIGTERM)
        assert proc.wait(60) == 0, fleet.explain()
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_that_ends_during_the_outage_is_finished_once_the_api_is_back(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    steps = 12
    job_id = submit(api, "outage-finish", {"seconds": 4.8, "steps": steps, "checkpoint_every": 2})
    worker = fleet.start_worker(server, "a")
    before = fleet.wait_for(lambda: running_with(api, job_id, 2, checkpointed=True), "the job to checkpoint step 2")
    kill_api(server)
    engine = make_engine(db_url)
    queue = Queue(engine, RetryPolicy(lease_seconds=LEASE_SECONDS))
    try:
        fleet.wait_for(lambda: queue.requeue_expired() == 1, "the lease to expire and the job to be requeued")
    finally:
        queue.close()
        engine.dispose()
    # the trainer has returned by now (4.8 s of training); the agent holds its result until the API is back
    fleet.wait_for(lambda: not worker.job_children(), "the job's child to end during the outage")
    server = fleet.restart_server(server)

    done = fleet.wait_for(lambda: finished(api, job_id), "the job to finish")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded" and done["result"] == {"loss": 1.0 / steps, "steps": steps}, context
    assert [(a["id"], a["outcome"]) for a in done["attempt_history"]] == [(before["attempt_id"], "succeeded")], context
    assert (done["losses"], done["checkpoint"]["step"]) == (0, steps), context
    assert [m["step"] for m in metrics_of(api, job_id, before["attempt_id"])] == list(range(1, steps + 1)), context
    kinds = [e["kind"] for e in ok(api.get(f"/jobs/{job_id}/events"))["events"]]
    assert kinds.count("regained") == 1 and kinds.count("succeeded") == 1, kinds
    assert worker.alive(), context
    fleet.assert_clean()
