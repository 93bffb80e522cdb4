"""Gang calls through the API (the real app in-process) with worker/client.py's ApiClient, and through the
DirectClient of embedded mode, on SQLite and on Postgres: claim with max_jobs, batched heartbeat and finish
with per-member replies, the worker secret on every call, bad input as a 422 naming the field."""
from __future__ import annotations

import json
import secrets

import httpx
import pytest
from sqlalchemy import select, update
from starlette.testclient import TestClient

from api.app import create_app
from common import schema as t
from common.settings import Settings
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from worker.client import WORKER_SECRET_HEADER, ApiClient, DirectClient, Refused

MAX_GANG = 8


@pytest.fixture
def api(db_url):
    token = "gf_gang_admin_" + secrets.token_hex(16)
    app = create_app(Settings(database_url=db_url, admin_token=token, lease_seconds=600.0, max_gang_jobs=MAX_GANG))
    http = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    grid = {"name": "g", "trainer": "noop", "zip": {"value": [float(i) for i in range(7)],
                                                     "fuse_group": ["x"] * 6 + [None]}}
    assert http.post("/api/v1/grids", json=grid).status_code == 201
    def answer(request: httpx.Request) -> httpx.Response:  # the ApiClient's own requests, to the app in-process
        reply = http.request(request.method, str(request.url), content=request.content, headers=dict(request.headers))
        return httpx.Response(reply.status_code, content=reply.content, headers=dict(reply.headers))

    client = ApiClient("http://testserver", token, retry_for=0.0, finish_retry_for=0.0)
    client._http.close()
    client._http = httpx.Client(transport=httpx.MockTransport(answer), headers={"Authorization": f"Bearer {token}"})
    worker_id = client.register({"name": "w", "host": "h", "trainers": ["noop"]})["worker_id"]
    yield client, http, worker_id, app.state.engine
    client.close()
    http.close()
    app.state.queue.close()
    app.state.engine.dispose()


def test_a_gang_through_the_api(api):
    client, http, worker_id, engine = api
    jobs = client.claim_gang(worker_id, 4, trainers=["noop"])
    assert len(jobs) == 4 and len({j["attempt_id"] for j in jobs}) == 4
    with engine.connect() as conn:
        keys = dict(conn.execute(select(t.jobs.c.id, t.jobs.c.fuse_key)).all())
    assert {keys[j["id"]] for j in jobs} == {"noop:x"}
    beats = client.heartbeat_gang(worker_id, [
        {"job_id": j["id"], "attempt_id": j["attempt_id"], "step": 3, "progress": [3, 10],
         "metrics": [{"step": 3, "values": {"loss": 0.5}}], "events": [{"kind": "log", "message": "hi"}]}
        for j in jobs])
    assert [(b["job_id"], b["ok"], b["stop"], b["cancel"]) for b in beats] == [(j["id"], True, False, False)
                                                                              for j in jobs]
    # One member is cancelled by a user: its next beat says so, the others' do not.
    assert http.post(f"/api/v1/jobs/{jobs[2]['id']}/cancel").status_code < 400
    beats = client.heartbeat_gang(worker_id, [{"job_id": j["id"], "attempt_id": j["attempt_id"]} for j in jobs])
    assert [b["cancel"] for b in beats] == [False, False, True, False]
    ends = client.finish_gang(worker_id, [
        {"job_id": j["id"], "attempt_id": j["attempt_id"], "outcome": "cancelled" if i == 2 else "succeeded",
         "result": {"loss": j["config"]["value"]}} for i, j in enumerate(jobs)])
    assert [(e["ok"], e["state"]) for e in ends] == [(True, "succeeded"), (True, "succeeded"), (True, "cancelled"),
                                                      (True, "succeeded")]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(select(t.jobs.c.id, t.jobs.c.state, t.jobs.c.step, t.jobs.c.result))}
        metrics = sorted(conn.execute(select(t.metrics.c.job_id)).scalars())
        logs = sorted(conn.execute(select(t.events.c.job_id).where(t.events.c.kind == "log")).scalars())
    assert [rows[j["id"]].step for j in jobs] == [3, 3, 3, 3]
    assert metrics == logs == sorted(j["id"] for j in jobs)
    assert rows[jobs[0]["id"]].result == {"loss": jobs[0]["config"]["value"]}
    # A finished gang is refused per member, with stop: a 200 carrying each member's answer.
    again = client.finish_gang(worker_id, [{"job_id": j["id"], "attempt_id": j["attempt_id"], "outcome": "succeeded"}
                                           for j in jobs[:2]])
    assert [(e["ok"], e["stop"]) for e in again] == [(False, True), (False, True)]
    assert jobs[0]["attempt_id"] in again[0]["reason"]
    # max_jobs 1 is today's claim (one "job"); the rest: two x jobs, then the unkeyed one alone.
    single = http.post(f"/api/v1/workers/{worker_id}/claim", json={"max_jobs": 1},
                       headers={WORKER_SECRET_HEADER: client._http.headers[WORKER_SECRET_HEADER]}).json()
    assert set(single) == {"job"} and keys[single["job"]["id"]] == "noop:x"
    assert [keys[j["id"]] for j in client.claim_gang(worker_id, 8)] == ["noop:x"]
    assert [keys[j["id"]] for j in client.claim_gang(worker_id, 8)] == [None]
    assert client.claim_gang(worker_id, 8) == []


def test_a_stale_member_through_the_api(api):
    client, http, worker_id, engine = api
    jobs = client.claim_gang(worker_id, 3)
    with engine.begin() as conn:
        conn.execute(update(t.jobs).where(t.jobs.c.id == jobs[1]["id"]).values(lease_expires_at=1.0))
    other = Queue(engine, RetryPolicy(lease_seconds=600.0))
    other_id = other.register_worker("o", "h", ["noop"])
    assert other.claim(other_id, grid_id=jobs[0]["grid_id"]).id == jobs[1]["id"]
    beats = client.heartbeat_gang(worker_id, [{"job_id": j["id"], "attempt_id": j["attempt_id"]} for j in jobs])
    assert [(b["ok"], b["stop"]) for b in beats] == [(True, False), (False, True), (True, False)]
    ends = client.finish_gang(worker_id, [{"job_id": j["id"], "attempt_id": j["attempt_id"], "outcome": "succeeded"}
                                          for j in jobs])
    assert [e["ok"] for e in ends] == [True, False, True]


def test_gang_calls_need_the_worker_secret_and_name_bad_fields(api):
    client, http, worker_id, engine = api
    secret = {WORKER_SECRET_HEADER: client._http.headers[WORKER_SECRET_HEADER]}
    jobs = client.claim_gang(worker_id, 2)
    member = {"job_id": jobs[0]["id"], "attempt_id": jobs[0]["attempt_id"]}
    base = f"/api/v1/workers/{worker_id}"
    for path, body in [("/claim", {"max_jobs": 2}), ("/heartbeat-gang", {"members": [member]}),
                       ("/finish-gang", {"members": [{**member, "outcome": "succeeded"}]})]:
        reply = http.post(base + path, json=body, headers={WORKER_SECRET_HEADER: "gfw_wrong"})
        assert reply.status_code == 403, (path, reply.text)
    bad = [
        ("/claim", {"max_jobs": 0}, "max_jobs"),
        ("/claim", {"max_jobs": MAX_GANG + 1}, "max_jobs"),
        ("/heartbeat-gang", {"members": []}, "members"),
        ("/heartbeat-gang", {"members": [member, {"job_id": 999_999, "attempt_id": "x"}]}, "members.1.job_id"),
        ("/heartbeat-gang", {"members": [member, member]}, "members.1.job_id"),
        ("/heartbeat-gang", {"members": [member] * (MAX_GANG + 1)}, "members"),
        ("/finish-gang", {"members": [{**member, "outcome": "done"}]}, "members.0.outcome"),
        ("/finish-gang", {"members": [{"job_id": 999_999, "attempt_id": "x", "outcome": "succeeded",
                                       "result": {"note": "\ud800"}}]}, "members.0.job_id"),
    ]
    for path, body, field in bad:
        reply = http.post(base + path, content=json.dumps(body),  # a lone surrogate travels as an escape
                          headers={**secret, "Content-Type": "application/json"})
        assert reply.status_code == 422, (path, body, reply.text)
        fields = [f["field"] for f in reply.json()["error"].get("fields", [])]
        assert field in fields, (path, field, reply.json())
    with engine.connect() as conn:  # nothing was written for the refused batches
        assert conn.execute(select(t.jobs.c.state).where(t.jobs.c.id == jobs[0]["id"])).scalar_one() == "running"
        assert conn.execute(select(t.events.c.id)).first() is None


def test_direct_client_gang(engine, queue):
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import fuse_key, validate_config

    spec = GridSpec.model_validate({"name": "d", "trainer": "noop", "axes": {"value": [1.0, 2.0, 3.0]},
                                    "config": {"fuse_group": "k"}})
    submit_grid(engine, spec, validate_config, fuse_key=fuse_key)
    client = DirectClient(queue, heartbeat_seconds=5.0)
    worker_id = client.register({"name": "w", "host": "h", "trainers": ["noop"]})["worker_id"]
    jobs = client.claim_gang(worker_id, 8)
    assert len(jobs) == 3
    beats = client.heartbeat_gang(worker_id, [{"job_id": j["id"], "attempt_id": j["attempt_id"], "step": 1,
                                               "metrics": [{"step": 1, "time": 1.0, "values": {"loss": "a\ud800"}}]}
                                              for j in jobs])
    assert all(b["ok"] for b in beats)
    ends = client.finish_gang(worker_id, [{"job_id": j["id"], "attempt_id": j["attempt_id"], "outcome": "error",
                                           "error": "boom"} for j in jobs])
    assert [(e["ok"], e["state"]) for e in ends] == [(True, "queued")] * 3
    with engine.connect() as conn:
        kinds = sorted(conn.execute(select(t.events.c.kind)).scalars())
    assert kinds == ["error"] * 3 + ["input_cleaned"] * 3
    for bad in (0, -2):
        with pytest.raises(Refused, match="max_jobs"):
            client.claim_gang(worker_id, bad)
    with pytest.raises(Refused, match="members.0.job_id"):
        client.finish_gang(worker_id, [{"job_id": 999_999, "attempt_id": "x", "outcome": "succeeded"}])
