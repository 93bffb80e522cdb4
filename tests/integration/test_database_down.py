"""The database stopped, crashed or restarting: every endpoint answers 503 `database_unavailable` with
Retry-After and a JSON body (never a 500, never a 401 for a good token), and works again once Postgres is
back, without restarting the API.

The app runs in this process (TestClient) on a Postgres server of the test session's own (tests/pgcluster.py),
which the tests stop and start with pg_ctl. Both database paths are covered: SQLAlchemy's pool (reads,
grids, jobs, register, events, token lookup) and the queue's raw psycopg connections (claim, heartbeat,
the succeeded/cancelled finish). The token cache is made long-lived so that requests reach the route's
own database work instead of stopping at the token lookup (tested on its own with a token never used).
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api import tokens
from api.app import create_app
from api.worker_secrets import HEADER as WORKER_SECRET_HEADER
from common.settings import Settings

API = "/api/v1"
ADMIN_TOKEN = "gf_dbdown_admin_" + "a" * 32
WAIT_S = 60.0  # any poll's deadline on a loaded machine
LOCK_XACT = "gf_test_row_lock"  # the prepared transaction that holds a job's row lock through a shutdown
SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Setup:
    client: TestClient
    pg_url: str  # plain libpq URL of the test's database, for our own psycopg connections
    worker_id: str
    job: dict[str, Any]  # claimed: its attempt is current
    unused_token: str  # valid, never sent before the outage: not in the token cache


def _register(client) -> str:
    """Register a worker; the client then sends its secret (X-Gridfleet-Worker-Secret) on every call."""
    registered = client.post(f"{API}/workers/register", json={"name": "w", "host": "h"}).json()
    client.headers[WORKER_SECRET_HEADER] = registered["worker_secret"]
    return registered["worker_id"]


@pytest.fixture
def setup(private_pg_url, tmp_path):
    app = create_app(Settings(database_url=private_pg_url, admin_token=ADMIN_TOKEN, home=tmp_path / "home"))
    app.state.token_cache = tokens.TokenCache(ttl=3600.0)
    _, unused_token = tokens.create_token(app.state.engine, "worker", "never used before the outage")
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        posted = client.post(f"{API}/grids", json={"name": "down", "trainer": "sleep", "config": {"seconds": 0},
                                                   "axes": {"steps": [1, 2, 3, 4]}})
        assert posted.status_code == 201, posted.text
        worker_id = _register(client)
        job = client.post(f"{API}/workers/{worker_id}/claim", json={"trainers": ["sleep"]}).json()["job"]
        fenced = {"job_id": job["id"], "attempt_id": job["attempt_id"]}
        # Both paths hold open connections when the server goes away: the pool's and the queue's raw one.
        assert client.post(f"{API}/workers/{worker_id}/heartbeat", json={**fenced, "step": 1}).status_code == 200
        assert client.get(f"{API}/grids/down").status_code == 200
        pg_url = make_url(private_pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
        yield Setup(client, pg_url, worker_id, job, unused_token)


def endpoints(s: Setup) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(method, path, JSON body) of every endpoint, with arguments that reach its database work."""
    w, job = f"{API}/workers/{s.worker_id}", s.job
    fenced = {"job_id": job["id"], "attempt_id": job["attempt_id"]}
    return [
        ("POST", f"{w}/heartbeat", {**fenced, "step": 2, "metrics": [{"step": 2, "values": {"loss": 0.5}}]}),
        ("POST", f"{w}/checkpoint", {**fenced, "pointer": {"uri": "local:ckpt", "step": 2}}),
        ("POST", f"{w}/events", {**fenced, "events": [{"kind": "log", "message": "hello"}]}),
        ("POST", f"{w}/code_rev", {**fenced, "code_rev": SHA}),
        ("POST", f"{w}/finish", {**fenced, "outcome": "succeeded", "result": {"loss": 0.5}}),  # raw psycopg
        ("POST", f"{w}/finish", {**fenced, "outcome": "error", "error": "boom"}),  # SQLAlchemy (reads the row)
        ("POST", f"{w}/claim", {"trainers": ["sleep"]}),
        ("POST", f"{w}/heartbeat", {}),  # an idle worker's
        ("POST", f"{w}/worker_events", {"kind": "note", "message": "hi"}),
        ("POST", f"{API}/workers/register", {"name": "w2", "host": "h"}),
        ("GET", f"{w}/events", None),
        ("GET", f"{API}/workers", None),
        ("POST", f"{API}/grids", {"name": "down", "trainer": "sleep", "config": {"seconds": 0},
                                  "axes": {"steps": [1, 2, 3, 4, 5]}}),
        ("GET", f"{API}/grids", None),
        ("GET", f"{API}/grids/down", None),
        ("GET", f"{API}/grids/down/results", None),
        ("GET", f"{API}/grids/down/results?format=csv", None),
        ("POST", f"{API}/grids/down/pause", None),
        ("POST", f"{API}/grids/down/resume", None),
        ("GET", f"{API}/jobs/{job['id']}", None),
        ("GET", f"{API}/jobs/{job['id']}/metrics", None),
        ("GET", f"{API}/jobs/{job['id']}/events", None),
        ("POST", f"{API}/jobs/{job['id'] + 1}/cancel", None),
        ("POST", f"{API}/jobs/{job['id'] + 1}/retry", None),
        ("GET", "/healthz", None),
    ]


def call(s: Setup, method: str, path: str, body: dict[str, Any] | None, **kwargs):
    return s.client.request(method, path, json=body, **kwargs)


def assert_unavailable(reply, what: str, port: int) -> None:
    assert reply.status_code == 503, f"{what}: {reply.status_code} {reply.text}"
    assert int(reply.headers.get("retry-after", "0")) >= 1, f"{what}: no Retry-After in {dict(reply.headers)}"
    assert reply.headers["content-type"].startswith("application/json"), what
    error = reply.json()["error"]
    assert error["code"] == "database_unavailable" and error["message"], (what, error)
    assert str(port) not in reply.text and "psycopg" not in reply.text, f"{what}: driver details leaked: {reply.text}"


def test_every_endpoint_answers_503_while_postgres_is_down_and_works_again_after(setup, pg_cluster):
    s = setup
    pg_cluster.stop("fast")
    try:
        for method, path, body in endpoints(s):
            assert_unavailable(call(s, method, path, body), f"{method} {path} {body}", pg_cluster.port)
        # A good token the cache has not seen needs the database: 503, not 401.
        reply = s.client.get(f"{API}/workers", headers={"Authorization": f"Bearer {s.unused_token}"})
        assert_unavailable(reply, "token lookup", pg_cluster.port)
    finally:
        pg_cluster.start()

    # Back, on the same API: every endpoint answers without a server error, the fenced writes succeed.
    ok = {"heartbeat": {"ok": True}, "checkpoint": {"ok": True}, "events": {"ok": True}, "code_rev": {"ok": True}}
    for method, path, body in endpoints(s):
        reply = call(s, method, path, body)
        assert reply.status_code < 500, f"after restart: {method} {path}: {reply.status_code} {reply.text}"
        name = path.rsplit("/", 1)[-1]
        if body and "attempt_id" in body and name in ok:
            assert reply.status_code == 200 and ok[name].items() <= reply.json().items(), (path, reply.text)
        if body and body.get("outcome") == "succeeded":
            assert reply.json() == {"ok": True, "state": "succeeded"}, reply.text
    assert s.client.get(f"{API}/workers", headers={"Authorization": f"Bearer {s.unused_token}"}).status_code == 200
    detail = s.client.get(f"{API}/jobs/{s.job['id']}").json()
    assert detail["state"] == "succeeded" and detail["checkpoint"]["step"] == 2, detail
    assert s.client.get("/healthz").json() == {"status": "ok", "database": "ok"}


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_statements_in_flight_when_postgres_stops_answer_503_and_the_api_recovers(setup, pg_cluster, mode):
    """A statement already sent when the server goes away (fast: AdminShutdown; immediate: the connection
    just closes) fails; it is not re-sent, the reply is 503. Each waits on a row lock we hold, so it is
    surely in flight when pg_ctl stops the server. A prepared transaction holds the lock: it outlives the
    shutdown, where a session's lock could go first and let a waiter commit before its own session ends."""
    s = setup
    w, job = f"{API}/workers/{s.worker_id}", s.job
    fenced = {"job_id": job["id"], "attempt_id": job["attempt_id"]}
    in_flight = [
        ("POST", f"{w}/heartbeat", {**fenced, "step": 3}),  # raw psycopg
        ("POST", f"{w}/finish", {**fenced, "outcome": "succeeded", "result": {"loss": 0.1}}),  # raw psycopg
        ("POST", f"{API}/jobs/{job['id']}/cancel", None),  # SQLAlchemy
    ]
    with psycopg.connect(s.pg_url) as locker:
        locker.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job["id"],))  # opens a transaction
        locker.execute(f"PREPARE TRANSACTION '{LOCK_XACT}'")
    try:
        with ThreadPoolExecutor(len(in_flight)) as pool, psycopg.connect(s.pg_url, autocommit=True) as watcher:
            replies = [pool.submit(call, s, *request) for request in in_flight]
            _wait_for_lock_waiters(watcher, len(in_flight), replies)
            pg_cluster.stop(mode)
            try:
                for (method, path, _), reply in zip(in_flight, replies):
                    assert_unavailable(reply.result(timeout=WAIT_S), f"{mode}: in flight {method} {path}",
                                       pg_cluster.port)
            finally:
                pg_cluster.start()
    finally:
        with psycopg.connect(s.pg_url, autocommit=True) as admin:
            admin.execute(f"ROLLBACK PREPARED '{LOCK_XACT}'")

    # Nothing was re-sent: the job still runs with the same attempt, which can heartbeat and finish now.
    beat = s.client.post(f"{w}/heartbeat", json={**fenced, "step": 4})
    assert beat.status_code == 200 and beat.json()["ok"] is True, beat.text
    done = s.client.post(f"{w}/finish", json={**fenced, "outcome": "succeeded", "result": {"loss": 0.1}})
    assert done.json() == {"ok": True, "state": "succeeded"}, done.text
    assert s.client.post(f"{API}/jobs/{job['id'] + 1}/cancel").status_code == 200


def _wait_for_lock_waiters(watcher: psycopg.Connection, count: int, replies) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        waiting = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0]
        if waiting >= count:
            return
        done = [r.result() for r in replies if r.done()]
        assert not done, f"a request did not wait for the row lock: {[(r.status_code, r.text) for r in done]}"
        assert time.monotonic() < deadline, f"only {waiting} of {count} statements wait on the row lock"
        time.sleep(0.05)


def test_a_repeated_finish_after_a_lost_reply_is_refused_and_the_job_stays_succeeded_once(setup):
    """When a finish committed but its reply was lost (the connection died just after the commit), the
    worker's retry is refused as stale (409, stop) and changes nothing: the agent logs it and moves on."""
    s = setup
    w, job = f"{API}/workers/{s.worker_id}", s.job
    body = {"job_id": job["id"], "attempt_id": job["attempt_id"], "outcome": "succeeded", "result": {"loss": 0.25}}
    assert s.client.post(f"{w}/finish", json=body).json() == {"ok": True, "state": "succeeded"}
    again = s.client.post(f"{w}/finish", json={**body, "result": {"loss": 9.0}})
    assert again.status_code == 409 and again.json()["error"]["code"] == "stale_attempt" and again.json()["stop"]
    detail = s.client.get(f"{API}/jobs/{job['id']}").json()
    assert detail["state"] == "succeeded" and detail["result"] == {"loss": 0.25}, detail
    assert [a["outcome"] for a in detail["attempt_history"]] == ["succeeded"], detail
    kinds = [e["kind"] for e in s.client.get(f"{API}/jobs/{job['id']}/events").json()["events"]]
    assert kinds.count("succeeded") == 1, kinds


def test_a_database_that_accepts_but_never_answers_fails_the_request_instead_of_hanging(policy):
    """A host that takes the TCP connection and then says nothing (a hung server, a half-open tunnel):
    without libpq's connect_timeout both paths would wait for it forever, each holding an API thread."""
    from common.db import POSTGRES_CONNECT_TIMEOUT_S, is_unavailable, make_engine
    from scheduler.queue import Queue

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
    engine = make_engine(f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/gridfleet")
    queue = Queue(engine, policy)
    pool = ThreadPoolExecutor(2)
    try:
        raw = pool.submit(queue.heartbeat, 1, "a" * 32, step=1, worker_id="w")  # the queue's raw psycopg connection
        pooled = pool.submit(queue.register_worker, name="w", host="h", trainers=[])  # SQLAlchemy's pool
        for path, attempt in (("raw", raw), ("pooled", pooled)):
            error = attempt.exception(timeout=POSTGRES_CONNECT_TIMEOUT_S * 6)
            assert error is not None and is_unavailable(error), f"{path}: {error!r}"
    finally:
        silent.close()  # resets a connection still waiting, so that no thread is left hanging
        pool.shutdown()
        engine.dispose()


def test_a_locked_sqlite_database_answers_503_and_serves_once_the_lock_is_gone(tmp_path, monkeypatch):
    """Embedded mode's equivalent: another process holds the write lock past the busy timeout. (Reads go
    on: in WAL mode a writer does not block them.)"""
    import sqlite3

    import common.db

    monkeypatch.setattr(common.db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # the wait before "database is locked"
    database = tmp_path / "gridfleet.db"
    app = create_app(Settings(database_url=f"sqlite:///{database}", admin_token=ADMIN_TOKEN, home=tmp_path / "home"))
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        worker_id = _register(client)
        holder = sqlite3.connect(database, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            for path, body in ((f"{API}/workers/register", {"name": "w2", "host": "h"}),
                               (f"{API}/workers/{worker_id}/claim", {}), (f"{API}/workers/{worker_id}/heartbeat", {}),
                               (f"{API}/grids", {"name": "locked", "trainer": "noop"})):
                assert_unavailable(client.post(path, json=body), f"POST {path}", port=-1)
            assert client.get(f"{API}/grids").status_code == 200
        finally:
            holder.close()
        assert client.post(f"{API}/workers/register", json={"name": "w2", "host": "h"}).status_code == 201
        assert client.get("/healthz").status_code == 200
