"""Queue.finish_and_claim (every test runs on SQLite and on Postgres): the finish is exactly `finish`'s, a
stale attempt's call claims nothing and changes nothing, the next job is claimed once; and the embedded
agent's loop (DirectClient) cycles through it. Time moves through `now=`, never by sleeping.
"""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from common import schema as t
from scheduler.grids import cancel_job, submit_grid
from scheduler.queue import Queue
from scheduler.spec import GridSpec
from worker.agent import Agent, AgentOptions
from worker.client import DirectClient
from worker.trainers import validate_config

LEASE = 30.0  # conftest's `policy` fixture


def grid(engine, name: str, n: int) -> tuple[int, list[int]]:
    spec = GridSpec.model_validate({"name": name, "trainer": "noop", "axes": {"value": [float(i) for i in range(n)]}})
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    with engine.connect() as conn:
        ids = list(conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid_id).order_by(t.jobs.c.id)).scalars())
    return grid_id, ids


def rows(engine, table, *order) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(*order)).mappings()]


def snapshot(engine) -> dict[str, list[dict]]:
    return {"jobs": rows(engine, t.jobs, t.jobs.c.id), "attempts": rows(engine, t.attempts, t.attempts.c.id),
            "events": rows(engine, t.events, t.events.c.id), "workers": rows(engine, t.workers, t.workers.c.id)}


def worker(engine, worker_id: str) -> dict:
    return next(w for w in rows(engine, t.workers, t.workers.c.id) if w["id"] == worker_id)


@pytest.fixture
def t0():
    return time.time()


def test_each_call_ends_the_attempt_and_claims_the_next_job_once(engine, queue, t0):
    _, ids = grid(engine, "g", 3)
    wid = queue.register_worker(name="w", host="h", trainers=["noop"])
    job = queue.claim(wid, trainers=["noop"], now=t0)
    seen = []
    while job is not None:
        seen.append(job.id)
        reply, job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 1.0}, now=t0,
                                            worker_id=wid, trainers=["noop"])
        assert reply.ok and reply.state == "succeeded"
        if job is not None:
            assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == ("busy", job.id)
    assert seen == ids
    assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == ("idle", None)
    state = snapshot(engine)
    assert [(j["state"], j["attempts"], j["result"], j["attempt_id"]) for j in state["jobs"]] == \
        [("succeeded", 1, {"loss": 1.0}, None)] * 3
    assert sorted((a["job_id"], a["outcome"], a["worker_id"]) for a in state["attempts"]) == \
        [(i, "succeeded", wid) for i in ids]
    assert [(e["job_id"], e["kind"]) for e in state["events"]] == [(i, "succeeded") for i in ids]


def test_a_stale_attempt_claims_nothing_and_changes_nothing(engine, queue, t0):
    _, ids = grid(engine, "g", 2)
    old = queue.register_worker(name="old", host="h", trainers=["noop"])
    new = queue.register_worker(name="new", host="h", trainers=["noop"])
    first = queue.claim(old, now=t0)
    again = queue.claim(new, now=t0 + LEASE + 1)  # the lease expired: requeued as lost, claimed again
    assert again.id == first.id and again.attempt_id != first.attempt_id
    before = snapshot(engine)
    reply, job = queue.finish_and_claim(first.id, first.attempt_id, "succeeded", {"loss": 0.0},
                                        now=t0 + LEASE + 2, worker_id=old)
    assert (reply.ok, reply.stop, job) == (False, True, None)
    reply, job = queue.finish_and_claim(again.id, again.attempt_id, "succeeded", {"loss": 0.0},
                                        now=t0 + LEASE + 2, worker_id=old)  # the current attempt, wrong worker
    assert (reply.ok, job) == (False, None)
    assert snapshot(engine) == before  # ids[1] is still queued, no attempt, event or worker write
    reply, job = queue.finish_and_claim(again.id, again.attempt_id, "succeeded", {"loss": 0.0},
                                        now=t0 + LEASE + 2, worker_id=new)
    assert reply.ok and job.id == ids[1]


@pytest.mark.parametrize("outcome", ["succeeded", "error", "preempted", "cancelled", "pruned", "cancel_requested"])
def test_the_finish_is_exactly_finishs(engine, queue, t0, outcome):
    """The same outcome through finish (grid a) and finish_and_claim (grid b): the same job row, attempt
    and event; finish_and_claim also holds the next job of its grid (the same one again when requeued at
    once)."""
    grids = {name: grid(engine, name, 2) for name in ("a", "b")}
    wid = queue.register_worker(name="w", host="h", trainers=["noop"])
    ends = {}
    for name, (grid_id, ids) in grids.items():
        job = queue.claim(wid, grid_id=grid_id, now=t0)
        assert job.id == ids[0]
        if outcome == "cancel_requested":
            cancel_job(engine, job.id)
        end = "error" if outcome == "cancel_requested" else outcome
        if name == "a":
            reply, nxt = queue.finish(job.id, job.attempt_id, end, {"loss": 2.0}, "boom", now=t0 + 1,
                                      worker_id=wid), None
        else:
            reply, nxt = queue.finish_and_claim(job.id, job.attempt_id, end, {"loss": 2.0}, "boom", now=t0 + 1,
                                                worker_id=wid, grid_id=grid_id)
        ends[name] = (reply, nxt, job.attempt_id)
    assert ends["a"][0] == ends["b"][0]
    state = snapshot(engine)
    ignored = {"id", "grid_id", "key", "config", "created_at", "started_at", "attempt_id", "worker_id",
               "lease_expires_at", "attempts"}  # the held next job's, when b's first job was claimed again

    def ended(name):
        grid_id, ids = grids[name]
        job_row = next(j for j in state["jobs"] if j["id"] == ids[0])
        attempt = next(a for a in state["attempts"] if a["id"] == ends[name][2])
        events = [(e["kind"], e["message"]) for e in state["events"] if e["job_id"] == ids[0]]
        return ({k: v for k, v in job_row.items() if k not in ignored},
                {k: attempt[k] for k in ("outcome", "ended_at", "error")}, events)

    a, b = ended("a"), ended("b")
    assert a[1] == b[1] and a[2] == b[2]
    if outcome == "preempted":  # requeued at once, so b's call claimed it again; a's stays queued
        assert (a[0].pop("state"), b[0].pop("state")) == ("queued", "running")
    assert a[0] == b[0]
    nxt, (b_first, b_second) = ends["b"][1], grids["b"][1]
    assert (nxt.id, nxt.attempt) == ((b_first, 2) if outcome == "preempted" else (b_second, 1))
    attempts_of = [a_["job_id"] for a_ in state["attempts"]]
    assert sorted(attempts_of) == sorted([grids["a"][1][0], b_first, nxt.id])  # each claim made one attempt


def test_the_embedded_agent_claims_each_next_job_with_the_last_finish(engine, queue, tmp_path):
    """A real Agent over DirectClient (its job children are real processes): three noop jobs, each finish but
    the last (--max-jobs) claims the next job, and every job ran exactly once."""
    _, ids = grid(engine, "g", 3)

    class Counting(DirectClient):
        calls: list[str] = []

        def claim(self, *args, **kwargs):
            self.calls.append("claim")
            return super().claim(*args, **kwargs)

        def finish(self, *args, **kwargs):
            self.calls.append("finish")
            return super().finish(*args, **kwargs)

        def finish_and_claim(self, *args, **kwargs):
            self.calls.append("finish_and_claim")
            return super().finish_and_claim(*args, **kwargs)

    client = Counting(Queue(engine, queue.policy), heartbeat_seconds=0.2)
    agent = Agent(client, AgentOptions(name="embedded", home=tmp_path, trainers=["noop"], max_gang=1, max_jobs=3,
                                       warm_starts=False, idle_sleep_max=0.2))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    thread.join(90)
    assert not thread.is_alive(), "the agent did not stop after --max-jobs"
    assert client.calls == ["claim", "finish_and_claim", "finish_and_claim", "finish"]
    state = snapshot(engine)
    assert [(j["id"], j["state"], j["attempts"]) for j in state["jobs"]] == [(i, "succeeded", 1) for i in ids]
    assert [a["outcome"] for a in state["attempts"]] == ["succeeded"] * 3
    assert [(w["state"], w["current_job_id"]) for w in state["workers"]] == [("idle", None)]


def test_a_job_claimed_with_the_last_finish_is_released_when_the_agent_stops(engine, queue, tmp_path):
    _, ids = grid(engine, "g", 2)
    client = DirectClient(queue, heartbeat_seconds=0.2)
    agent = Agent(client, AgentOptions(name="embedded", home=tmp_path, trainers=["noop"], max_gang=1))
    agent.worker_id = client.register({"name": "embedded", "host": "h", "trainers": ["noop"]})["worker_id"]
    first = client.claim(agent.worker_id, trainers=["noop"])
    reply, agent.next_job = client.finish_and_claim(agent.worker_id, first["id"], first["attempt_id"], "succeeded",
                                                    {"loss": 0.0}, claim={"trainers": ["noop"]})
    assert reply["ok"] and agent.next_job["id"] == ids[1]
    agent._release_next_job()  # what the loop does when it stops before running it
    assert agent.next_job is None
    job = next(j for j in snapshot(engine)["jobs"] if j["id"] == ids[1])
    assert (job["state"], job["preemptions"], job["attempt_id"]) == ("queued", 1, None)


def test_the_sqlite_claim_looks_up_each_jobs_grid_instead_of_reading_every_grid(tmp_path):
    """SQLite builds an `IN (SELECT ...)` list by reading every grid on each claim; embedded databases collect
    a grid per run. The claim looks up the job's grid by its key instead, and still skips inactive grids."""
    from common.db import make_engine, migrate
    from scheduler.grids import cancel_grid, pause_grid
    from scheduler.queue import _SQLITE_CLAIM, CLAIM_FLOOR

    url = f"sqlite:///{tmp_path / 'claim.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        (paused, _), (cancelled, _), (active, ids) = (grid(engine, name, 2) for name in ("p", "c", "a"))
        pause_grid(engine, paused)
        cancel_grid(engine, cancelled)
        queue = Queue(engine)
        with queue._raw_sqlite.transaction() as conn:
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + _SQLITE_CLAIM, {
                "aid": "a", "wid": "w", "lease": 0.0, "now": time.time(), "gpus": 0.0, "any_trainer": True,
                "trainers": '[""]', "can_pin": False, "any_grid": True, "grid_id": 0, "code_rev": None,
                "from_rank": CLAIM_FLOOR[0], "from_id": CLAIM_FLOOR[1]}))
        assert "SCAN grids" not in plan and "SEARCH grids USING INTEGER PRIMARY KEY" in plan, plan
        claimed = [queue.claim("w", now=time.time()) for _ in range(3)]
        assert [job and job.id for job in claimed] == [*ids, None]
    finally:
        engine.dispose()
