"""The API through a real uvicorn process (`uvicorn --factory api.app:create_app`), on SQLite and on
Postgres: auth and roles, grid submission with dedup and all-or-nothing validation, the worker protocol
with fencing, grid summaries and CSV results.

One server per backend serves the whole module (start-up is the slow part); every test uses its own grid
names, and tests that check "nothing was written" compare the whole grid list and the database before and
after. Every reply any test receives is recorded: none may be a 5xx, and no token may appear in a body or
a header. Waits poll with generous deadlines, never fixed sleeps.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from api.tokens import create_token
from common import schema as t
from common.db import make_engine
from conftest import fresh_postgres

START_DEADLINE = 90.0  # a cold server on a loaded 2-core machine
REQUEST_TIMEOUT = 60.0  # the first gated_rnn validation imports torch in the server
API = "/api/v1"


# ---- the server ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """terminate, then kill: never leave a server behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is just the server
            proc.wait(timeout=15)


def _start_server(db_url: str, admin_token: str, workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=db_url, GRIDFLEET_ADMIN_TOKEN=admin_token, GRIDFLEET_HOME=str(workdir / "home"),
               PYTHONUNBUFFERED="1", HF_HUB_DISABLE_TELEMETRY="1")
    log_path = workdir / "server.log"
    last_problem = ""
    for _ in range(3):  # the free port may be taken between choosing it and binding it: try another
        port = _free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
                env=env, cwd=workdir,  # cwd: no stray .env from the repository is read
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    return proc, url, log_path
            except httpx.HTTPError as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        _stop(proc)
        last_problem = f"exit code {proc.returncode}; {last_problem}"
    pytest.fail(f"the API server did not become healthy ({last_problem}); log:\n{log_path.read_text()[-4000:]}")


@dataclass
class Server:
    backend: str
    url: str
    db_url: str
    engine: object
    log_path: Path
    tokens: dict[str, str]  # role -> token ('admin' is GRIDFLEET_ADMIN_TOKEN)
    replies: list[httpx.Response] = field(default_factory=list)

    def client(self, role: str | None = None, token: str | None = None) -> httpx.Client:
        headers = {}
        secret = token if token is not None else (self.tokens[role] if role else None)
        if secret is not None:
            headers["Authorization"] = f"Bearer {secret}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT,
                            event_hooks={"response": [self._record]})

    def _record(self, response: httpx.Response) -> None:
        response.read()
        self.replies.append(response)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"api-{request.param}")
    drop = None
    if request.param == "sqlite":
        db_url = f"sqlite:///{workdir / 'gridfleet.db'}"  # empty: the server migrates it at start
    else:
        db_url, drop = fresh_postgres(request.getfixturevalue("pg_template"))  # from tests/conftest.py

    admin_token = "adm-" + secrets.token_urlsafe(24)
    proc, url, log_path = _start_server(db_url, admin_token, workdir)
    engine = make_engine(db_url)
    try:
        tokens = {"admin": admin_token}
        for role in ("submit", "worker"):
            tokens[role] = create_token(engine, role, f"e2e {role}")[1]
        yield Server(request.param, url, db_url, engine, log_path, tokens)
    finally:
        _stop(proc)
        engine.dispose()
        if drop:
            drop()


@pytest.fixture(autouse=True)
def _every_reply_is_clean(request):
    """After each test: no reply was a 5xx, and no token appears in any reply body or header."""
    if "server" not in request.fixturenames:
        yield
        return
    srv: Server = request.getfixturevalue("server")
    srv.replies.clear()
    yield
    replies, srv.replies[:] = list(srv.replies), []
    errors = [f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text[:300]}"
              for r in replies if r.status_code >= 500]
    assert not errors, errors
    for r in replies:
        exposed = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        for role, secret in srv.tokens.items():
            assert secret not in exposed, f"the {role} token appears in {r.request.method} {r.request.url.path}"


# ---- helpers -------------------------------------------------------------------------------------------
def _error(reply: httpx.Response, status: int) -> dict:
    """Assert a JSON error reply with a message a person can act on; return the body."""
    assert reply.status_code == status, f"expected {status}, got {reply.status_code}: {reply.text[:500]}"
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("code"), str) and body["error"]["code"]
    assert isinstance(body["error"].get("message"), str) and len(body["error"]["message"]) > 10
    return body


def _fields(body: dict) -> list[str]:
    return [f["field"] for f in body["error"].get("fields", [])]


def _state(srv: Server) -> tuple:
    """Everything a rejected POST must leave alone: the grid list as the API shows it, and the tables."""
    with srv.client("admin") as c:
        reply = c.get(f"{API}/grids")
    assert reply.status_code == 200
    grids = sorted((g["name"], g["trainer"], g["total"], tuple(sorted(g["counts"].items())))
                   for g in reply.json()["grids"])
    with srv.engine.connect() as conn:
        tables = tuple(conn.execute(select(func.count()).select_from(tbl)).scalar_one()
                       for tbl in (t.grids, t.jobs, t.attempts, t.events))
        specs = dict(conn.execute(select(t.grids.c.name, t.grids.c.spec)).all())
    return grids, tables, specs


def _post_grid(c: httpx.Client, spec: dict) -> httpx.Response:
    return c.post(f"{API}/grids", json=spec)


SECRET_HEADER = "X-Gridfleet-Worker-Secret"


def _register(c: httpx.Client, name: str, **fields) -> tuple[str, dict[str, str]]:
    """Register a worker; returns its id and the headers its calls need (its own worker secret)."""
    reply = c.post(f"{API}/workers/register", json={"name": name, "host": "e2e", **fields})
    assert reply.status_code == 201, reply.text
    return reply.json()["worker_id"], {SECRET_HEADER: reply.json()["worker_secret"]}


# ---- tests ---------------------------------------------------------------------------------------------
def test_healthz_needs_no_token(server):
    with server.client() as c:
        reply = c.get("/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "database": "ok"}


def test_missing_or_bad_tokens_are_401_json(server):
    with server.client() as anonymous:
        for method, path in (("GET", f"{API}/grids"), ("GET", f"{API}/workers"), ("POST", f"{API}/grids"),
                             ("POST", f"{API}/workers/register"), ("GET", f"{API}/jobs/1"),
                             ("POST", f"{API}/workers/not!an-id/heartbeat")):  # the token before the path
            body = _error(anonymous.request(method, path), 401)
            assert body["error"]["code"] == "unauthorized"
            assert "bearer token" in body["error"]["message"].lower()
        reply = anonymous.get(f"{API}/grids")
        assert reply.headers.get("www-authenticate", "").lower().startswith("bearer")
        # Auth comes before body validation: an anonymous caller learns nothing about the body.
        body = _error(anonymous.post(f"{API}/grids", json={"name": "bad name!", "trainer": "nope"}), 401)
        assert body["error"]["code"] == "unauthorized"
        body = _error(anonymous.get(f"{API}/grids", headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)
    for bad in ("gf_" + secrets.token_urlsafe(32), server.tokens["admin"] + "x", "x" * 5000):
        with server.client(token=bad) as c:
            body = _error(c.get(f"{API}/grids"), 401)
            assert body["error"]["code"] == "unauthorized"
            assert "invalid or revoked token" in body["error"]["message"]
            _error(c.post(f"{API}/grids", json={"name": "e2e-never", "trainer": "noop"}), 401)
    with server.client("admin") as c:
        _error(c.get(f"{API}/grids/e2e-never"), 404)


def test_roles(server):
    spec = {"name": "e2e-roles", "trainer": "noop", "axes": {"value": [1.0, 2.0]}}
    with server.client("worker") as w:
        body = _error(_post_grid(w, spec), 403)
        assert body["error"]["code"] == "forbidden"
        assert "admin or submit" in body["error"]["message"] and "'worker'" in body["error"]["message"]
        assert w.get(f"{API}/grids").status_code == 200  # any role may read
        assert w.post(f"{API}/workers/register", json={"name": "w", "host": "h"}).status_code == 201
    with server.client("admin") as a:
        assert a.get(f"{API}/grids/e2e-roles").status_code == 404  # the 403 wrote nothing
    with server.client("submit") as s:
        created = _post_grid(s, spec)
        assert created.status_code == 201, created.text
        assert created.json()["created"] == 2
        body = _error(s.post(f"{API}/workers/register", json={"name": "s", "host": "h"}), 403)
        assert "admin or worker" in body["error"]["message"]
        assert s.post(f"{API}/grids/e2e-roles/pause").json()["state"] == "paused"
    with server.client("worker") as w:
        _error(w.post(f"{API}/grids/e2e-roles/resume"), 403)
        _error(w.post(f"{API}/grids/e2e-roles/cancel"), 403)
    with server.client("admin") as a:
        assert a.post(f"{API}/grids/e2e-roles/resume").json()["state"] == "active"
        more = _post_grid(a, {**spec, "axes": {"value": [1.0, 2.0, 3.0]}})
        assert more.status_code == 200 and more.json()["created"] == 1
        worker_id, as_a = _register(a, "a")
        claimed = a.post(f"{API}/workers/{worker_id}/claim", headers=as_a,
                         json={"grid_id": more.json()["grid_id"]})
        assert claimed.status_code == 200 and claimed.json()["job"] is not None
        assert a.get(f"{API}/workers").status_code == 200
        assert a.post(f"{API}/grids/e2e-roles/cancel").json()["state"] == "cancelled"


def test_submit_a_seed_002_conf_json_continues_or_forces_a_new_run(server, tmp_path):
    script = Path(sys.executable).with_name("gridfleet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_") and k != "DATABASE_URL"}
    env.update(GRIDFLEET_SERVER_URL=server.url, GRIDFLEET_TOKEN=server.tokens["submit"])
    conf = tmp_path / "conf.json"  # seed 002's file, as its users keep it
    conf.write_text(json.dumps({"name": "SNN_DDQN", "continue_run": True, "agents": 1, "hidden_layers": [16],
                                "architecture": "snn", "snn_tSteps": 5, "snn_beta": 0.95,
                                "stop_learning_at_win_percent": 80, "upload_to_cloud": False}))

    def submit(*flags: str) -> str:
        done = subprocess.run(cmd + ["submit", str(conf), *flags], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    assert submit() == "grid SNN_DDQN: 1 created, 0 already existed"
    assert submit() == "grid SNN_DDQN: 0 created, 1 already existed"  # continue_run: the same job resumes
    assert submit("--forcenewrun") == "grid SNN_DDQN: 1 created, 0 already existed"  # a new run beside the old
    with server.client("submit") as c:
        results = c.get(f"{API}/grids/SNN_DDQN/results").json()["results"]
    assert [r["config"]["architecture"] for r in results] == ["snn", "snn"]
    assert sum("run_tag" in r["config"] for r in results) == 1


def test_a_worker_token_made_by_the_cli_works(server, tmp_path):
    script = Path(sys.executable).with_name("gridfleet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_") and k != "DATABASE_URL"}
    env["DATABASE_URL"] = server.db_url
    made = subprocess.run(cmd + ["token", "create", "--role", "worker", "--name", "cli worker"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("gf_") and token not in made.stderr
    server.tokens["cli-worker"] = token  # checked against every reply from now on
    with server.client(token=token) as c:
        body = _error(_post_grid(c, {"name": "e2e-cli", "trainer": "noop"}), 403)
        assert "'cli worker'" in body["error"]["message"]
        assert c.post(f"{API}/workers/register", json={"name": "cli", "host": "h"}).status_code == 201


def test_submit_then_repost_adds_only_new_configs(server):
    spec = {"name": "e2e-dedup", "trainer": "noop", "axes": {"value": [1.0, 2.0, 3.0]}, "seeds": [0, 1]}
    with server.client("submit") as c:
        first = _post_grid(c, spec)
        assert first.status_code == 201, first.text
        body = first.json()
        assert (body["name"], body["created"], body["existing"], body["total"], body["new_grid"]) == \
            ("e2e-dedup", 6, 0, 6, True)
        grid_id = body["grid_id"]

        again = _post_grid(c, {**spec, "axes": {"value": [1.0, 2.0, 3.0, 4.0]}})
        assert again.status_code == 200, again.text
        body = again.json()
        assert (body["grid_id"], body["created"], body["existing"], body["total"], body["new_grid"]) == \
            (grid_id, 2, 6, 8, False)

        same = _post_grid(c, {**spec, "axes": {"value": [4.0, 3.0, 2.0, 1.0]}})  # order does not matter
        assert same.status_code == 200 and (same.json()["created"], same.json()["existing"]) == (0, 8)

        summary = c.get(f"{API}/grids/e2e-dedup")
        assert summary.status_code == 200
        assert summary.json()["total"] == 8 and summary.json()["counts"]["queued"] == 8
        by_id = c.get(f"{API}/grids/{grid_id}")
        assert by_id.status_code == 200 and by_id.json()["name"] == "e2e-dedup"
    with server.engine.connect() as conn:
        rows = conn.execute(select(t.jobs.c.config, t.jobs.c.seed).where(t.jobs.c.grid_id == grid_id)).all()
    assert sorted((r.config["value"], r.seed) for r in rows) == [(v, s) for v in (1.0, 2.0, 3.0, 4.0) for s in (0, 1)]


BAD_GRIDS = [
    # (label, request body, expected code, a field the error must name, text the message must contain)
    ("unknown trainer", {"name": "e2e-bad", "trainer": "no_such_trainer"}, "unknown_trainer", "trainer",
     "no_such_trainer"),
    ("sleep seconds < 0", {"name": "e2e-bad", "trainer": "sleep", "config": {"seconds": -1}}, "invalid_config",
     "config.seconds", "greater than or equal"),
    ("gated_rnn n_layers 0", {"name": "e2e-bad", "trainer": "gated_rnn", "axes": {"n_layers": [2, 0]}},
     "invalid_config", "config.n_layers", "n_layers"),
    ("noop unknown key", {"name": "e2e-bad", "trainer": "noop", "config": {"valu": 1.0}}, "invalid_config",
     "config.valu", "valu"),
    ("empty axis", {"name": "e2e-bad", "trainer": "noop", "axes": {"value": []}}, "invalid_request", "axes",
     "empty"),
    ("axis not a list", {"name": "e2e-bad", "trainer": "noop", "axes": {"value": 3}}, "invalid_request",
     "axes.value", "list"),
    ("too many jobs", {"name": "e2e-bad", "trainer": "noop", "axes": {"value": [float(i) for i in range(1000)]},
                       "seeds": list(range(101))}, "invalid_grid", "axes", "100,000"),
    ("bad grid name", {"name": "bad name!", "trainer": "noop"}, "invalid_request", "name", "name"),
    ("grid name too long", {"name": "g" * 101, "trainer": "noop"}, "invalid_request", "name", "name"),
    ("unknown top-level key", {"name": "e2e-bad", "trainer": "noop", "axis": {"value": [1.0]}},
     "invalid_request", "axis", "axis"),
    ("seed beyond 32 bits", {"name": "e2e-bad", "trainer": "noop", "seeds": [2**31]}, "invalid_grid", "seeds.0",
     "32 bits"),
    ("duplicate seeds", {"name": "e2e-bad", "trainer": "noop", "seeds": [1, 1]}, "invalid_request", "seeds",
     "duplicates"),
    # Re-posts of an existing grid (made in the test) with new configs, one of them invalid: all or nothing.
    ("re-post with one invalid new config", {"name": "e2e-atomic", "trainer": "noop",
                                             "axes": {"value": [1.0, 2.0, 3.0, 4.0, "not a number"]}},
     "invalid_config", "config.value", "number"),
    ("re-post with another trainer", {"name": "e2e-atomic", "trainer": "sleep", "axes": {"seconds": [0.0]}},
     "invalid_grid", "trainer", "already exists"),
]


def test_rejected_posts_write_nothing(server):
    with server.client("submit") as c:
        base = _post_grid(c, {"name": "e2e-atomic", "trainer": "noop", "axes": {"value": [1.0, 2.0]}})
        assert base.status_code == 201 and base.json()["created"] == 2
        before = _state(server)
        for label, spec, code, field_name, text_in_message in BAD_GRIDS:
            body = _error(_post_grid(c, spec), 422)
            assert body["error"]["code"] == code, (label, body)
            assert field_name in _fields(body), (label, body)
            assert text_in_message.lower() in body["error"]["message"].lower(), (label, body)
            if code == "unknown_trainer":
                assert {"noop", "sleep", "gated_rnn"} <= set(body["known_trainers"]), body
                assert "noop" in body["error"]["message"]  # the message lists them too
            assert _state(server) == before, f"{label}: a rejected POST changed the database"
            assert c.get(f"{API}/grids/e2e-bad").status_code == 404, label
        # Bodies that are not a grid at all.
        for raw in (b"{", b'{"name": "e2e-bad", "trainer": "noop", "config": {"value": NaN}}', b"[]", b""):
            _error(c.post(f"{API}/grids", content=raw, headers={"Content-Type": "application/json"}), 422)
        assert _state(server) == before
        # The grid as stored is the grid as it was: its spec was not replaced by a rejected one.
        summary = c.get(f"{API}/grids/e2e-atomic").json()
        assert summary["total"] == 2 and summary["spec"]["axes"] == {"value": [1.0, 2.0]}
        # And a valid re-post still adds exactly the new configs.
        ok = _post_grid(c, {"name": "e2e-atomic", "trainer": "noop", "axes": {"value": [1.0, 2.0, 3.0]}})
        assert ok.status_code == 200 and (ok.json()["created"], ok.json()["existing"]) == (1, 2)


def test_worker_protocol_over_http(server):
    values = [0.3, 0.1, 0.2]
    with server.client("submit") as s:
        made = _post_grid(s, {"name": "e2e-proto", "trainer": "noop", "axes": {"value": values},
                              "objective": "min:loss"})
        assert made.status_code == 201
        grid_id = made.json()["grid_id"]
    with server.client("worker") as w:
        reg = w.post(f"{API}/workers/register", json={"name": "proto", "host": "e2e", "trainers": ["noop"]})
        assert reg.status_code == 201, reg.text
        worker_id = reg.json()["worker_id"]
        assert reg.json()["lease_seconds"] > 0 and reg.json()["heartbeat_seconds"] > 0
        w.headers[SECRET_HEADER] = reg.json()["worker_secret"]  # this client speaks for this worker from now on
        base = f"{API}/workers/{worker_id}"
        assert w.post(f"{base}/heartbeat", json={}).json() == {"ok": True}  # idle: "I am alive"
        _error(w.post(f"{API}/workers/nosuchworker/claim", json={}), 404)

        finished = []
        while True:
            reply = w.post(f"{base}/claim", json={"trainers": ["noop"], "grid_id": grid_id})
            assert reply.status_code == 200, reply.text
            job = reply.json()["job"]
            if job is None:
                break
            assert job["trainer"] == "noop" and job["grid_id"] == grid_id and job["attempt"] == 1
            fenced = {"job_id": job["id"], "attempt_id": job["attempt_id"]}
            beat = w.post(f"{base}/heartbeat", json={**fenced, "step": 1, "progress": [1, 2],
                                                     "metrics": [{"step": 1, "values": {"loss": 9.0}}]})
            assert beat.status_code == 200, beat.text
            assert beat.json()["ok"] is True and beat.json()["stop"] is False and beat.json()["cancel"] is False
            _error(w.post(f"{base}/heartbeat", json={"job_id": job["id"]}), 422)  # attempt id is required
            cp = w.post(f"{base}/checkpoint", json={**fenced, "pointer": {"uri": "local:ckpt", "step": 1}})
            assert cp.status_code == 200 and cp.json() == {"ok": True}
            done = w.post(f"{base}/finish", json={**fenced, "outcome": "succeeded",
                                                  "result": {"loss": job["config"]["value"]}})
            assert done.status_code == 200 and done.json() == {"ok": True, "state": "succeeded"}
            # The attempt is over: every further write with it is refused with stop...
            for path, extra in (("finish", {"outcome": "succeeded", "result": {"loss": -1.0}}),
                                ("heartbeat", {"step": 2}),
                                ("events", {"events": [{"kind": "log", "message": "late"}]})):
                body = _error(w.post(f"{base}/{path}", json={**fenced, **extra}), 409)
                assert body["error"]["code"] == "stale_attempt" and body["stop"] is True, (path, body)
            # ...but the final checkpoint's pointer, which a Hub upload records after the job finished.
            late = w.post(f"{base}/checkpoint", json={**fenced, "pointer": {"uri": "hf://a/b/c.pt", "step": 2}})
            assert late.status_code == 200 and w.get(f"{API}/jobs/{job['id']}").json()["checkpoint"]["step"] == 2
            finished.append(job["id"])
        assert len(finished) == 3

        summary = w.get(f"{API}/grids/e2e-proto").json()
        assert summary["total"] == 3 and summary["counts"]["succeeded"] == 3 and summary["progress"] == 1.0
        assert summary["best"]["metric"] == "loss" and summary["best"]["value"] == 0.1
        assert summary["best"]["config"] == {"value": 0.1}
        results = w.get(f"{API}/grids/e2e-proto/results").json()["results"]
        assert [r["result"]["loss"] for r in results] == [0.1, 0.2, 0.3]  # best first
        metrics = w.get(f"{API}/jobs/{finished[0]}/metrics").json()["metrics"]
        assert [(m["step"], m["loss"]) for m in metrics] == [(1, 9.0)]

        reply = w.get(f"{API}/grids/e2e-proto/results", params={"format": "csv"})
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/csv")
        assert "e2e-proto-results.csv" in reply.headers.get("content-disposition", "")
        rows = list(csv.DictReader(io.StringIO(reply.text)))
        assert len(rows) == 3
        assert {"job_id", "state", "seed", "config.value", "result.loss"} <= set(rows[0])
        assert [float(r["result.loss"]) for r in rows] == [0.1, 0.2, 0.3]
        assert all(r["state"] == "succeeded" for r in rows)
        assert float(rows[0]["config.value"]) == 0.1
        _error(w.get(f"{API}/grids/e2e-proto/results", params={"format": "xml"}), 422)
        _error(w.get(f"{API}/grids/e2e-nope/results", params={"format": "csv"}), 404)


def test_an_expired_lease_makes_the_old_attempt_stale(server):
    with server.client("submit") as s:
        made = _post_grid(s, {"name": "e2e-lease", "trainer": "noop", "config": {"value": 0.5}})
        assert made.status_code == 201
        grid_id = made.json()["grid_id"]
    with server.client("worker") as w:
        a, as_a = _register(w, "a")
        b, as_b = _register(w, "b")
        job_a = w.post(f"{API}/workers/{a}/claim", headers=as_a, json={"grid_id": grid_id}).json()["job"]
        assert job_a is not None
        assert w.post(f"{API}/workers/{b}/claim", headers=as_b, json={"grid_id": grid_id}).json()["job"] is None
        assert w.post(f"{API}/workers/{a}/heartbeat", headers=as_a,
                      json={"job_id": job_a["id"], "attempt_id": job_a["attempt_id"]}).status_code == 200

        # Worker A goes silent and its lease runs out (time moved on in the database, not by sleeping).
        with server.engine.begin() as conn:
            conn.execute(update(t.jobs).where(t.jobs.c.id == job_a["id"]).values(lease_expires_at=time.time() - 1))
        job_b = w.post(f"{API}/workers/{b}/claim", headers=as_b, json={"grid_id": grid_id}).json()["job"]
        assert job_b is not None and job_b["id"] == job_a["id"]
        assert job_b["attempt_id"] != job_a["attempt_id"] and job_b["attempt"] == 2

        stale = {"job_id": job_a["id"], "attempt_id": job_a["attempt_id"]}
        for path, extra in (("heartbeat", {"step": 3}), ("finish", {"outcome": "succeeded", "result": {"loss": 7.0}}),
                            ("checkpoint", {"pointer": {"step": 3}})):
            body = _error(w.post(f"{API}/workers/{a}/{path}", headers=as_a, json={**stale, **extra}), 409)
            assert body["stop"] is True and body["error"]["code"] == "stale_attempt"
            assert job_a["attempt_id"] in body["error"]["message"]

        fresh = {"job_id": job_b["id"], "attempt_id": job_b["attempt_id"]}
        assert w.post(f"{API}/workers/{b}/heartbeat", headers=as_b, json=fresh).json()["ok"] is True
        done = w.post(f"{API}/workers/{b}/finish", headers=as_b,
                      json={**fresh, "outcome": "succeeded", "result": {"loss": 0.5}})
        assert done.status_code == 200 and done.json()["state"] == "succeeded"
        _error(w.post(f"{API}/workers/{a}/finish", headers=as_a, json={**stale, "outcome": "succeeded"}), 409)

        detail = w.get(f"{API}/jobs/{job_a['id']}").json()
        assert detail["state"] == "succeeded" and detail["result"] == {"loss": 0.5}
        assert [(x["id"], x["outcome"]) for x in detail["attempt_history"]] == [
            (job_a["attempt_id"], "lost"), (job_b["attempt_id"], "succeeded")]
        events = [e["kind"] for e in w.get(f"{API}/jobs/{job_a['id']}/events").json()["events"]]
        assert events.count("succeeded") == 1 and events.count("lost") == 1


def _job_rows(srv: Server, job_id: int) -> dict[str, list]:
    """Everything a write for the job could touch: its row, attempts, metrics and events, and every worker."""
    with srv.engine.connect() as conn:
        return {
            "job": [dict(r) for r in conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings()],
            **{name: [dict(r) for r in conn.execute(select(table).where(table.c.job_id == job_id)
                                                    .order_by(table.c.id)).mappings()]
               for name, table in (("attempts", t.attempts), ("metrics", t.metrics), ("events", t.events))},
            "workers": [dict(r) for r in conn.execute(select(t.workers).order_by(t.workers.c.id)).mappings()],
        }


def test_a_worker_acts_only_for_its_own_registration(server, tmp_path):
    """Worker B, with its own worker token and registration, knows A's worker id and attempt id (GET /jobs
    shows both) and tries every fenced write: 409 on its own path (the job is not B's), 403 on A's path
    without A's secret (whatever the token, admin included). Nothing is written; A finishes the job once."""
    with server.client("submit") as s:
        made = _post_grid(s, {"name": "e2e-own", "trainer": "noop", "config": {"value": 0.5}, "code_rev": "exp-1"})
        assert made.status_code == 201
        grid_id = made.json()["grid_id"]
    server.tokens["worker-b"] = create_token(server.engine, "worker", "e2e worker b")[1]  # checked on every reply
    with server.client("worker") as wa, server.client("worker-b") as wb, server.client("admin") as admin:
        a, as_a = _register(wa, "own-a")
        b, as_b = _register(wb, "own-b")
        job = wa.post(f"{API}/workers/{a}/claim", headers=as_a,
                      json={"grid_id": grid_id, "can_pin_code": True}).json()["job"]
        assert job is not None and job["worker_id"] == a
        fenced = {"job_id": job["id"], "attempt_id": job["attempt_id"]}
        beat = wa.post(f"{API}/workers/{a}/heartbeat", headers=as_a,
                       json={**fenced, "step": 1, "metrics": [{"step": 1, "values": {"loss": 2.0}}]})
        assert beat.status_code == 200, beat.text
        shown = wb.get(f"{API}/jobs/{job['id']}").json()
        assert (shown["worker_id"], shown["attempt_id"]) == (a, job["attempt_id"])  # what B can learn
        before = _job_rows(server, job["id"])

        writes = [("heartbeat", {"step": 9, "progress": [9, 10], "metrics": [{"step": 9, "values": {"loss": 0.0}}],
                                 "events": [{"kind": "log", "message": "not mine"}]}),
                  ("checkpoint", {"pointer": {"uri": "local:/elsewhere", "step": 9}}),
                  ("events", {"events": [{"kind": "log", "message": "not mine"}]}),
                  ("code_rev", {"code_rev": "b" * 40})]
        writes += [("finish", {"outcome": outcome, "result": {"loss": 0.0}, "error": "x"})
                   for outcome in ("succeeded", "error", "preempted", "cancelled")]
        made_up = {SECRET_HEADER: "gfw_" + secrets.token_urlsafe(32)}
        for path, extra in writes:
            body = {**fenced, **extra}
            refused = _error(wb.post(f"{API}/workers/{b}/{path}", headers=as_b, json=body), 409)
            assert refused["error"]["code"] == "stale_attempt" and refused["stop"] is True, (path, refused)
            for caller, who, headers in ((wb, "B's secret", as_b), (wb, "no secret", {}), (wb, "made up", made_up),
                                         (admin, "admin, no secret", {}), (admin, "admin, B's secret", as_b)):
                refused = _error(caller.post(f"{API}/workers/{a}/{path}", headers=headers, json=body), 403)
                assert refused["error"]["code"] == "wrong_worker_secret", (path, who, refused)
                assert SECRET_HEADER in refused["error"]["message"] and a in refused["error"]["message"], (path, who)
        # Nor can B act as A outside the job: claim, say A is alive, or record A's events.
        for path, body in (("claim", {}), ("heartbeat", {}), ("worker_events", {"kind": "x", "message": "y"})):
            _error(wb.post(f"{API}/workers/{a}/{path}", headers=as_b, json=body), 403)
        # The secret check comes first: a bad body on A's path without A's secret is a 403, not a 422.
        _error(wb.post(f"{API}/workers/{a}/finish", headers=as_b, json={"job_id": "x"}), 403)
        assert _fields(_error(wb.post(f"{API}/workers/{'x' * 33}/claim", headers=as_b, json={}), 422)) == ["worker_id"]
        assert _job_rows(server, job["id"]) == before

        # A fresh API process (as after a restart: nothing cached) takes A's secret from the database.
        proc, url, _ = _start_server(server.db_url, server.tokens["admin"], tmp_path)
        try:
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT, event_hooks={"response": [server._record]},
                              headers={"Authorization": f"Bearer {server.tokens['worker']}"}) as fresh:
                _error(fresh.post(f"{API}/workers/{a}/heartbeat", headers=as_b, json=fenced), 403)
                assert fresh.post(f"{API}/workers/{a}/heartbeat", headers=as_a, json=fenced).json()["ok"] is True
        finally:
            _stop(proc)

        done = wa.post(f"{API}/workers/{a}/finish", headers=as_a,
                       json={**fenced, "outcome": "succeeded", "result": {"loss": 0.5}})
        assert done.status_code == 200 and done.json() == {"ok": True, "state": "succeeded"}, done.text
        _error(wa.post(f"{API}/workers/{a}/finish", headers=as_a, json={**fenced, "outcome": "succeeded"}), 409)
        detail = wa.get(f"{API}/jobs/{job['id']}").json()
        assert (detail["state"], detail["result"], detail["checkpoint"]) == ("succeeded", {"loss": 0.5}, None)
        assert [(x["worker_id"], x["outcome"], x["code_rev"]) for x in detail["attempt_history"]] == [
            (a, "succeeded", "exp-1")]
        kinds = [e["kind"] for e in wa.get(f"{API}/jobs/{job['id']}/events").json()["events"]]
        assert kinds == ["succeeded"]
        metrics = wa.get(f"{API}/jobs/{job['id']}/metrics").json()["metrics"]
        assert [(m["step"], m["loss"]) for m in metrics] == [(1, 2.0)]

        # The secrets went out once each, in register's reply: never in another reply, the database or the log.
        shown = [admin.get(f"{API}/workers").text, admin.get(f"{API}/jobs/{job['id']}").text,
                 admin.get(f"{API}/workers/{a}/events").text]
        stored = repr(_job_rows(server, job["id"]))
        for secret in (as_a[SECRET_HEADER], as_b[SECRET_HEADER]):
            digest = hashlib.sha256(secret.encode()).hexdigest()
            assert digest in stored and secret not in stored  # only the hash is kept...
            assert all(secret not in text and digest not in text for text in shown)  # ...and shown to no one
            assert secret not in server.log_path.read_text(errors="replace")
            assert secret not in (tmp_path / "server.log").read_text(errors="replace")


def test_no_token_in_the_server_log(server):
    """Runs last in the module: by now the server has seen every token, good and bad."""
    with server.client("admin") as c:
        assert c.get(f"{API}/grids").status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert "Uvicorn running" in log or "Application startup complete" in log  # the log is really this one
    for role, secret in server.tokens.items():
        assert secret not in log, f"the {role} token appears in the server log"
