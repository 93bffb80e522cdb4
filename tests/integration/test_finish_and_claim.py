"""Queue.finish_and_claim (every test runs on SQLite and on Postgres): the finish is exactly `finish`'s, a
stale attempt's call claims nothing and changes nothing, the next job is claimed once; and the embedded
agent's loop (DirectClient) cycles through it. Time moves through `now=` (or a frozen clock), never by sleeping.

A call with `now=` scans for expired leases, and on Postgres a call that scans runs `finish` then `claim`;
the tests marked "one statement" call without `now` on a Queue whose scan is not due, so on Postgres the
terminal outcomes (succeeded, cancelled, pruned) take the one-statement path (Queue._pg_finish_claim).
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import Counter
from contextlib import contextmanager

import pytest
from sqlalchemy import select

from common import schema as t
from common.db import make_engine
from scheduler import reports
from scheduler.reports import list_workers
from scheduler.grids import cancel_job, submit_grid
from scheduler.policy import RetryPolicy
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
    """Every row a cycle writes; `events` as GET /jobs/{id}/events shows them (an attempt row can be its end
    event), job by job."""
    jobs = rows(engine, t.jobs, t.jobs.c.id)
    return {"jobs": jobs, "attempts": rows(engine, t.attempts, t.attempts.c.id),
            "events": [e for j in jobs for e in reports.job_events(engine, j["id"])],
            "workers": rows(engine, t.workers, t.workers.c.id)}


def worker(engine, worker_id: str) -> dict:
    """The worker as GET /workers shows it: state and current job derived from the jobs it runs."""
    return next(w for w in reports.list_workers(engine) if w["id"] == worker_id)


@pytest.fixture
def t0():
    return time.time()


@pytest.fixture
def unscanned(engine, policy):
    """A Queue whose expiry scan is due only on its first call (and with `now=`): calls without `now`
    after that take finish_and_claim's one-statement path on Postgres."""
    queue = Queue(engine, policy, expiry_scan_seconds=3600.0)
    yield queue
    queue.close()


class _Counted:
    """A psycopg connection (or cursor) that counts the statements run on it."""

    def __init__(self, conn, counts: list[str]):
        self._conn, self._counts = conn, counts

    def execute(self, statement, *args, **kwargs):
        self._counts.append(statement)
        return self._conn.execute(statement, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def count_statements(queue: Queue, monkeypatch) -> list[str]:
    """The statements `queue` runs on its raw Postgres connections from now on (SQLite: none are counted)."""
    counts: list[str] = []
    if queue._autocommit is None:
        return counts
    connection, cursor = queue._autocommit.connection, queue._autocommit.cursor

    @contextmanager
    def counted():
        with connection() as conn:
            yield _Counted(conn, counts)

    @contextmanager
    def counted_cursor():
        with cursor() as kept:
            yield _Counted(kept, counts)
    monkeypatch.setattr(queue._autocommit, "connection", counted)
    monkeypatch.setattr(queue._autocommit, "cursor", counted_cursor)
    return counts


def one_statement_path(engine) -> bool:
    return engine.dialect.name == "postgresql"


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
    old, new, first, again = _lost_and_claimed_again(queue, t0)
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
    nxt, (b_first, _) = ends["b"][1], grids["b"][1]
    _assert_ended_alike(_end_of(state, grids["a"][1][0], ends["a"][2]), _end_of(state, b_first, ends["b"][2]),
                        outcome, nxt, grids["b"][1])
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
    assert [(w["state"], w["current_job_id"]) for w in reports.list_workers(engine)] == [("idle", None)]


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
    a grid per run. The claim looks up the job's grid by its key instead, and still skips inactive grids. It
    reads the covering ix_grids_state, not the grid's row: reaching `state` there walks a large spec's overflow
    pages (migration 0015)."""
    from common.db import make_engine, migrate
    from scheduler.grids import cancel_grid, pause_grid
    from scheduler.claim_sql import CLAIM_FLOOR, ClaimFilters, sqlite_claim

    url = f"sqlite:///{tmp_path / 'claim.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        (paused, _), (cancelled, _), (active, ids) = (grid(engine, name, 2) for name in ("p", "c", "a"))
        pause_grid(engine, paused)
        cancel_grid(engine, cancelled)
        queue = Queue(engine)
        with queue._raw_sqlite.transaction() as conn:
            claim = sqlite_claim(ClaimFilters.of(None, 0.0, False, None))
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + claim, {
                "aid": "a", "wid": "w", "lease": 0.0, "now": time.time(),
                "from_rank": CLAIM_FLOOR[0], "from_id": CLAIM_FLOOR[1]}))
        assert "SCAN grids" not in plan and "SEARCH grids USING COVERING INDEX ix_grids_state" in plan, plan
        claimed = [queue.claim("w", now=time.time()) for _ in range(3)]
        assert [job and job.id for job in claimed] == [*ids, None]
    finally:
        engine.dispose()


# ---- the one-statement path (Postgres; the same calls on SQLite run its one transaction) --------------
def test_one_statement_cycles_claim_each_job_once_and_write_the_worker_once(engine, unscanned, monkeypatch):
    _, ids = grid(engine, "g", 3)
    queue = unscanned
    wid = queue.register_worker(name="w", host="h", trainers=["noop"])
    job = queue.claim(wid, trainers=["noop"])  # the scan, once
    statements = count_statements(queue, monkeypatch)
    monkeypatch.setattr(queue, "finish", None)  # the one statement must not fall back to finish then claim
    seen, per_call = [], []
    while job is not None:
        seen.append(job.id)
        before = len(statements)
        reply, job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 1.0}, worker_id=wid,
                                            trainers=["noop"])
        per_call.append(len(statements) - before)
        assert reply.ok and reply.state == "succeeded"
        expected = ("busy", job.id) if job is not None else ("idle", None)
        assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == expected
    assert seen == ids
    if one_statement_path(engine):  # the last call found nothing from the floor: the scan, then a claim
        assert per_call[:2] == [1, 1] and per_call[2] > 1, per_call
    state = snapshot(engine)
    assert [(j["state"], j["attempts"], j["result"], j["attempt_id"], j["worker_id"]) for j in state["jobs"]] == \
        [("succeeded", 1, {"loss": 1.0}, None, None)] * 3
    assert sorted((a["job_id"], a["outcome"], a["worker_id"]) for a in state["attempts"]) == \
        [(i, "succeeded", wid) for i in ids]
    assert all(a["ended_at"] is not None for a in state["attempts"])
    assert [(e["job_id"], e["kind"]) for e in state["events"]] == [(i, "succeeded") for i in ids]


@pytest.mark.parametrize("outcome", ["succeeded", "cancelled", "pruned"])
def test_one_statement_never_claims_the_job_it_finishes(engine, unscanned, monkeypatch, outcome):
    """The only job of the queue, finished in the one statement: nothing to claim (the finished job is
    terminal, so finish then claim would not claim it either), the job ends as `finish` ends it, one attempt,
    the worker idle."""
    _, (only,) = grid(engine, "g", 1)
    queue = unscanned
    wid = queue.register_worker(name="w", host="h", trainers=["noop"])
    job = queue.claim(wid)
    reply, nxt = queue.finish_and_claim(job.id, job.attempt_id, outcome, {"loss": 1.0}, worker_id=wid)
    assert (reply.ok, reply.state, nxt) == (True, outcome, None)
    state = snapshot(engine)
    assert [(j["id"], j["state"], j["attempts"], j["attempt_id"]) for j in state["jobs"]] == [(only, outcome, 1, None)]
    assert [(a["job_id"], a["outcome"]) for a in state["attempts"]] == [(only, outcome)]
    assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == ("idle", None)


def test_one_statement_refused_claims_nothing_and_changes_nothing(engine, unscanned, t0, monkeypatch):
    _, ids = grid(engine, "g", 2)
    queue = unscanned
    old, new, first, again = _lost_and_claimed_again(queue, t0)
    before = snapshot(engine)
    statements = count_statements(queue, monkeypatch)
    for attempt_id, worker_id in ((first.attempt_id, old), (again.attempt_id, old), ("no-such-attempt", new)):
        reply, job = queue.finish_and_claim(again.id, attempt_id, "succeeded", {"loss": 0.0}, worker_id=worker_id)
        assert (reply.ok, reply.stop, job) == (False, True, None)
    assert snapshot(engine) == before  # ids[1] still queued; no attempt, event or worker write
    if one_statement_path(engine):
        assert any("LEFT JOIN claimed" in s for s in statements), "the one statement did not run"
    reply, job = queue.finish_and_claim(again.id, again.attempt_id, "succeeded", {"loss": 0.0}, worker_id=new)
    assert reply.ok and job.id == ids[1]
    assert (worker(engine, new)["state"], worker(engine, new)["current_job_id"]) == ("busy", ids[1])
    assert [w for w in snapshot(engine)["workers"] if w["id"] == old] == [w for w in before["workers"] if w["id"] == old]


@pytest.mark.parametrize("outcome", ["succeeded", "error", "preempted", "cancelled", "pruned", "cancel_requested"])
def test_one_statement_finish_is_exactly_finishs(engine, unscanned, monkeypatch, t0, outcome):
    """test_the_finish_is_exactly_finishs without `now=` (a frozen clock instead), so that the terminal
    outcomes take the one statement on Postgres: the same job row, attempt and event as `finish`."""
    grids = {name: grid(engine, name, 2) for name in ("a", "b")}
    queue = unscanned
    wid = queue.register_worker(name="w", host="h", trainers=["noop"])
    jobs = {name: queue.claim(wid, grid_id=grid_id, now=t0) for name, (grid_id, _) in grids.items()}
    if outcome == "cancel_requested":
        for job in jobs.values():
            cancel_job(engine, job.id)
    end = "error" if outcome == "cancel_requested" else outcome
    monkeypatch.setattr(time, "time", lambda: t0 + 1)
    statements = count_statements(queue, monkeypatch)
    ends = {"a": (queue.finish(jobs["a"].id, jobs["a"].attempt_id, end, {"loss": 2.0}, "boom", worker_id=wid), None),
            "b": queue.finish_and_claim(jobs["b"].id, jobs["b"].attempt_id, end, {"loss": 2.0}, "boom",
                                        worker_id=wid, grid_id=grids["b"][0])}
    monkeypatch.undo()
    if one_statement_path(engine):
        assert any("LEFT JOIN claimed" in s for s in statements) == (end in ("succeeded", "cancelled", "pruned"))
    assert ends["a"][0] == ends["b"][0]
    state = snapshot(engine)
    nxt = ends["b"][1]
    _assert_ended_alike(_end_of(state, jobs["a"].id, jobs["a"].attempt_id),
                        _end_of(state, jobs["b"].id, jobs["b"].attempt_id), outcome, nxt, grids["b"][1])
    assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == ("busy", nxt.id)


def test_one_statement_falls_back_to_the_scan_when_the_floor_finds_nothing(engine, unscanned, monkeypatch):
    """A job of higher priority added behind the claim floor: the one statement claims from the floor while
    jobs are left there; when it finds nothing, the claim scans from the first job, as `claim` does."""
    _, ids = grid(engine, "low", 2)
    queue = unscanned
    wid = queue.register_worker(name="w", host="h", trainers=["noop"])
    first = queue.claim(wid)
    spec = GridSpec.model_validate({"name": "high", "trainer": "noop", "priority": 5, "axes": {"value": [1.0]}})
    high = submit_grid(engine, spec, validate_config).grid_id
    reply, second = queue.finish_and_claim(first.id, first.attempt_id, "succeeded", {"loss": 0.0}, worker_id=wid)
    assert reply.ok and second.id == ids[1]  # from the floor
    reply, third = queue.finish_and_claim(second.id, second.attempt_id, "succeeded", {"loss": 0.0}, worker_id=wid)
    assert reply.ok and third is not None and third.grid_id == high
    assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == ("busy", third.id)
    reply, none = queue.finish_and_claim(third.id, third.attempt_id, "succeeded", {"loss": 0.0}, worker_id=wid)
    assert reply.ok and none is None
    assert (worker(engine, wid)["state"], worker(engine, wid)["current_job_id"]) == ("idle", None)


# ---- a race of processes, each cycling through finish_and_claim -------------------------------------------
RACERS = 6
RACE_JOBS = 240


def _cycling_worker(db_url: str, name: str, barrier, results) -> None:
    """Register, claim once (the expiry scan), then finish_and_claim until nothing is left: on Postgres each
    call is the one statement (the last one's fallback claim scans). Reports every claim and finish."""
    from test_claim_race import LONG_LEASE, START_TIMEOUT
    claims: list[tuple[int, str]] = []
    finishes: list[tuple[int, bool, str | None]] = []
    fast: list[int] = []  # calls that ran the one statement (Postgres)
    try:
        engine = make_engine(db_url)
        q = Queue(engine, RetryPolicy(lease_seconds=LONG_LEASE), expiry_scan_seconds=3600.0)
        q.register_worker(name=name, host="h", trainers=["noop"], worker_id=name)
        one_statement = q._pg_finish_claim

        def counted(*args, **kwargs):
            fast.append(1)
            return one_statement(*args, **kwargs)
        q._pg_finish_claim = counted
        barrier.wait(timeout=START_TIMEOUT)
        job = q.claim(name, trainers=["noop"])
        while job is not None:
            claims.append((job.id, job.attempt_id))
            reply, nxt = q.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=name,
                                            trainers=["noop"])
            finishes.append((job.id, reply.ok, reply.state))
            job = nxt
        q.close()
        engine.dispose()
        results.put({"name": name, "claims": claims, "finishes": finishes, "fast": len(fast), "error": None})
    except BaseException:  # noqa: BLE001 - report everything to the test process
        results.put({"name": name, "claims": claims, "finishes": finishes, "fast": len(fast),
                     "error": traceback.format_exc()})


def test_processes_racing_through_finish_and_claim_claim_each_job_exactly_once(db_url, engine):
    from test_claim_race import race

    _, ids = grid(engine, "race", RACE_JOBS)
    _, reports, _ = race(_cycling_worker, db_url, workers=RACERS)
    errors = [f"{r['name']}:\n{r['error']}" for r in reports if r["error"]]
    assert not errors, "worker processes failed:\n" + "\n".join(errors)
    claims = [(job_id, attempt_id, r["name"]) for r in reports for job_id, attempt_id in r["claims"]]
    per_job = Counter(job_id for job_id, _, _ in claims)
    assert sorted(per_job) == ids and set(per_job.values()) == {1}, {j: n for j, n in per_job.items() if n > 1}
    assert all(ok and state == "succeeded" for r in reports for _, ok, state in r["finishes"])
    assert len({name for _, _, name in claims}) >= 2, "no race: one process claimed everything"
    if one_statement_path(engine):
        assert [r["fast"] for r in reports] == [len(r["finishes"]) for r in reports]
    state = snapshot(engine)
    assert {(j["state"], j["attempts"], j["attempt_id"]) for j in state["jobs"]} == {("succeeded", 1, None)}
    stored = {(a["job_id"], a["id"], a["worker_id"], a["outcome"]) for a in state["attempts"]}
    assert stored == {(job_id, attempt_id, name, "succeeded") for job_id, attempt_id, name in claims}
    assert Counter(e["job_id"] for e in state["events"] if e["kind"] == "succeeded") == Counter(ids)
    assert {(w["state"], w["current_job_id"]) for w in list_workers(engine)} == {("idle", None)}


# A job row's columns that differ between two jobs ended alike (the held next job's too, when b's first job
# was claimed again).
_NOT_COMPARED = {"id", "grid_id", "key", "config", "created_at", "started_at", "attempt_id", "worker_id",
                 "lease_expires_at", "attempts"}


def _end_of(state: dict, job_id: int, attempt_id: str) -> tuple[dict, dict, list]:
    """How a job ended, from a snapshot: its row (less _NOT_COMPARED), its attempt's end, its events."""
    job_row = next(j for j in state["jobs"] if j["id"] == job_id)
    attempt = next(a for a in state["attempts"] if a["id"] == attempt_id)
    events = [(e["kind"], e["message"]) for e in state["events"] if e["job_id"] == job_id]
    return ({k: v for k, v in job_row.items() if k not in _NOT_COMPARED},
            {k: attempt[k] for k in ("outcome", "ended_at", "error")}, events)


def _assert_ended_alike(a: tuple, b: tuple, outcome: str, nxt, b_ids: list[int]) -> None:
    """a ended by finish, b by finish_and_claim: the same end, and b's call claimed the job finish-then-claim
    would (its first job again when it was preempted, else its second)."""
    assert a[1] == b[1] and a[2] == b[2]
    if outcome == "preempted":  # requeued at once, so b's call claimed it again; a's stays queued
        assert (a[0].pop("state"), b[0].pop("state")) == ("queued", "running")
    assert a[0] == b[0]
    b_first, b_second = b_ids
    assert (nxt.id, nxt.attempt) == ((b_first, 2) if outcome == "preempted" else (b_second, 1))


def _lost_and_claimed_again(queue, t0: float):
    """Worker `old` claims the first job and loses its lease; worker `new` claims it again: (old, new, old's
    claim, new's claim), so old's attempt is stale."""
    old = queue.register_worker(name="old", host="h", trainers=["noop"])
    new = queue.register_worker(name="new", host="h", trainers=["noop"])
    first = queue.claim(old, now=t0)
    again = queue.claim(new, now=t0 + LEASE + 1)  # the lease expired: requeued as lost, claimed again
    assert again.id == first.id and again.attempt_id != first.attempt_id
    return old, new, first, again
