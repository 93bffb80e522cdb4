"""Bad bodies against a real `gridfleet serve`, on SQLite and on Postgres: deep nesting on every body, NUL and
lone surrogates in every string field, huge bodies, a stale finish with an odd body.

Exact fields (names, configs, resources, pointers, kinds, ids) get a 422 naming the field and nothing stored
changes (every table compared before and after). Free text and a trainer's numbers (metric values, results,
errors, event messages) are stored with U+FFFD in place of the bad character, the reply and an
`input_cleaned` event on the job say so, and reading them back works. Bodies are sent as JSON text made by
hand (`_text`): the standard encoder writes NUL and lone surrogates as escapes, and a deep value is spliced
in as text because no encoder can build it.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import select

from common import schema as t
from api.worker_secrets import HEADER as WORKER_SECRET_HEADER
from common.db import make_engine
from conftest import fresh_postgres
from tests.e2e.processes import Fleet, Server

NUL, SURROGATE = "a\x00b", "a\ud800b"
BAD = pytest.mark.parametrize("bad", [NUL, SURROGATE], ids=["nul", "lone_surrogate"])
DEPTH = pytest.mark.parametrize("depth", [300, 1000])
FENCE = {"job_id": "@JOB@", "attempt_id": "@ATTEMPT@"}
TABLES = (t.grids, t.jobs, t.attempts, t.events, t.metrics, t.workers, t.worker_events)


@dataclass
class Env:
    server: Server
    engine: object
    admin: httpx.Client
    worker: httpx.Client


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    drop = None
    if request.param == "sqlite":
        db_url = f"sqlite:///{tmp / 'gridfleet.db'}"
    else:
        db_url, drop = fresh_postgres(request.getfixturevalue("pg_template"))
    fleet = Fleet(tmp)
    engine = None
    try:
        server = fleet.start_server(db_url)
        engine = make_engine(db_url)
        worker = httpx.Client(base_url=server.url + "/api/v1", timeout=60.0,
                              headers={"Authorization": f"Bearer {server.worker_token}"})
        fleet.clients.append(worker)
        yield Env(server, engine, server.api, worker)
        fleet.assert_clean()  # no traceback in the server's log: nothing reached the 500 handler
    finally:
        fleet.close()
        if engine is not None:
            engine.dispose()
        if drop:
            drop()


# ---- helpers -------------------------------------------------------------------------------------------
def _text(body: dict, depth: int = 0, job: dict | None = None) -> bytes:
    """The body as JSON text: "@DEEP@" becomes a value nested `depth` levels, the fence the job's."""
    text = json.dumps(body)  # ensure_ascii: NUL and lone surrogates as \\u escapes, as a client sends them
    text = text.replace('"@DEEP@"', '{"a":' * depth + "1" + "}" * depth)
    if job is not None:
        text = text.replace('"@JOB@"', str(job["id"])).replace("@ATTEMPT@", job["attempt_id"])
    return text.encode()


def _post(client: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def _snapshot(env: Env) -> dict:
    """Every row a refused request must leave alone."""
    with env.engine.connect() as conn:
        return {tbl.name: sorted(map(repr, conn.execute(select(tbl)).all())) for tbl in TABLES}


def _refused(reply: httpx.Response, status: int, field: str, words: str) -> None:
    assert reply.status_code == status, f"expected {status}, got {reply.status_code}: {reply.text[:500]}"
    error = reply.json()["error"]
    assert words in error["message"], error
    if field:
        assert field in [f["field"] for f in error["fields"]], error
        assert error["message"].startswith(f"invalid request: {field}: "), error


def _running(env: Env) -> tuple[str, dict]:
    """A registered worker and a job it runs now (its own one-job grid)."""
    name = f"bad-{uuid.uuid4().hex[:8]}"
    grid = env.admin.post("/grids", json={"name": name, "trainer": "sleep", "config": {"seconds": 0.01}})
    assert grid.status_code == 201, grid.text
    registered = env.worker.post("/workers/register", json={"name": name, "host": "h"}).json()
    worker_id = registered["worker_id"]
    env.worker.headers[WORKER_SECRET_HEADER] = registered["worker_secret"]  # this worker's calls from now on
    job = env.worker.post(f"/workers/{worker_id}/claim", json={"grid_id": grid.json()["grid_id"]}).json()["job"]
    assert job is not None
    return worker_id, job


def _grid(**fields) -> dict:
    return {"name": f"bad-{uuid.uuid4().hex[:8]}", "trainer": "sleep", "config": {"seconds": 0.01}, **fields}


# ---- exact fields: 422 naming the field, nothing stored changes ----------------------------------------
GRID_STRINGS = {  # field -> the grid's fields with "@BAD@" where the bad string goes
    "name": {"name": "g@BAD@"}, "trainer": {"trainer": "@BAD@"},
    "config": {"config": {"seconds": 0.01, "tag": "@BAD@"}},
    "config (a key)": {"config": {"seconds": 0.01, "@BAD@": 1}},
    "axes": {"axes": {"tag": ["x", "@BAD@"]}}, "axes (a key)": {"axes": {"@BAD@": [1]}},
    "zip": {"zip": {"tag": ["@BAD@"]}}, "exclude": {"exclude": [{"tag": "@BAD@"}]},
    "sample": {"sample": {"n": 2, "params": {"tag": {"choice": ["@BAD@"]}}}},
    "resources": {"resources": {"gpus": 0, "kind": "@BAD@"}}, "objective": {"objective": "min:@BAD@"},
    "store": {"store": "local@BAD@"}, "code_rev": {"code_rev": "abcd@BAD@"},
}
WORKER_STRINGS = {  # (path under /workers/{id}, body, the field named)
    "register name": ("register", {"name": "@BAD@", "host": "h"}, "name"),
    "register host": ("register", {"name": "w", "host": "@BAD@"}, "host"),
    "register trainers": ("register", {"name": "w", "host": "h", "trainers": ["@BAD@"]}, "trainers.0"),
    "register gpus": ("register", {"name": "w", "host": "h", "gpus": ["@BAD@"]}, "gpus"),
    "register resources": ("register", {"name": "w", "host": "h", "resources": {"k": "@BAD@"}}, "resources"),
    "register resources key": ("register", {"name": "w", "host": "h", "resources": {"@BAD@": 1}}, "resources"),
    "register code_rev": ("register", {"name": "w", "host": "h", "code_rev": "@BAD@"}, "code_rev"),
    "claim trainers": ("claim", {"trainers": ["@BAD@"]}, "trainers.0"),
    "claim code_rev": ("claim", {"code_rev": "@BAD@"}, "code_rev"),
    "heartbeat attempt_id": ("heartbeat", {**FENCE, "attempt_id": "@BAD@"}, "attempt_id"),
    "heartbeat event kind": ("heartbeat", {**FENCE, "events": [{"kind": "@BAD@", "message": "m"}]},
                             "events.0.kind"),
    "checkpoint pointer": ("checkpoint", {**FENCE, "pointer": {"uri": "local:@BAD@", "step": 1}}, "pointer"),
    "checkpoint pointer key": ("checkpoint", {**FENCE, "pointer": {"@BAD@": 1}}, "pointer"),
    "events kind": ("events", {**FENCE, "events": [{"kind": "@BAD@", "message": "m"}]}, "events.0.kind"),
    "finish attempt_id": ("finish", {**FENCE, "attempt_id": "@BAD@", "outcome": "succeeded"}, "attempt_id"),
    "code_rev": ("code_rev", {**FENCE, "code_rev": "@BAD@"}, "code_rev"),
    "worker event kind": ("worker_events", {"kind": "@BAD@", "message": "m"}, "kind"),
    "worker event resources": ("worker_events", {"kind": "k", "message": "m", "resources": {"k": "@BAD@"}},
                               "resources"),
}


def _with_bad(body: dict, bad: str) -> dict:
    return json.loads(json.dumps(body).replace("@BAD@", json.dumps(bad)[1:-1]))


def _worker_path(worker_id: str, op: str) -> str:
    return "/workers/register" if op == "register" else f"/workers/{worker_id}/{op}"


@BAD
@pytest.mark.parametrize("case", list(GRID_STRINGS))
def test_a_bad_character_in_a_grid_is_a_422_naming_the_field(env, case, bad):
    before = _snapshot(env)
    reply = _post(env.admin, "/grids", _text(_with_bad(_grid(**GRID_STRINGS[case]), bad)))
    field = case.split(" ")[0]
    assert reply.status_code == 422, reply.text
    assert field in [f["field"] for f in reply.json()["error"]["fields"]], reply.text
    if field not in ("name", "objective", "code_rev"):  # those three are patterns: the pattern is the message
        _refused(reply, 422, field, "NUL character" if bad == NUL else "lone surrogate")
    assert _snapshot(env) == before


@BAD
@pytest.mark.parametrize("case", list(WORKER_STRINGS))
def test_a_bad_character_in_an_exact_worker_field_is_a_422_naming_it(env, case, bad):
    worker_id, job = _running(env)
    op, body, field = WORKER_STRINGS[case]
    before = _snapshot(env)
    reply = _post(env.worker, _worker_path(worker_id, op), _text(_with_bad(body, bad), job=job))
    assert reply.status_code == 422, reply.text
    assert field in [f["field"] for f in reply.json()["error"]["fields"]], reply.text
    if field != "code_rev" or op != "code_rev":  # the code_rev endpoint's is a sha pattern
        _refused(reply, 422, field, "NUL character" if bad == NUL else "lone surrogate")
    assert _snapshot(env) == before


# ---- deep nesting: 422 naming the field and the limit ---------------------------------------------------
DEEP_BODIES = {  # (admin grid or worker op, body with "@DEEP@", the field named)
    "grid config": ("grids", _grid(config={"seconds": 0.01, "x": "@DEEP@"}), "config"),
    "grid axes values": ("grids", _grid(axes={"x": ["@DEEP@"]}), "axes"),
    "grid resources": ("grids", _grid(resources={"gpus": 0, "x": "@DEEP@"}), "resources"),
    "register resources": ("register", {"name": "w", "host": "h", "resources": {"x": "@DEEP@"}}, "resources"),
    "register gpus": ("register", {"name": "w", "host": "h", "gpus": ["@DEEP@"]}, "gpus"),
    "heartbeat metrics": ("heartbeat", {**FENCE, "metrics": [{"step": 1, "values": {"x": "@DEEP@"}}]}, "metrics"),
    "checkpoint pointer": ("checkpoint", {**FENCE, "pointer": {"step": 1, "x": "@DEEP@"}}, "pointer"),
    "finish result": ("finish", {**FENCE, "outcome": "succeeded", "result": {"x": "@DEEP@"}}, "result"),
    "worker event resources": ("worker_events", {"kind": "k", "message": "m", "resources": {"x": "@DEEP@"}},
                               "resources"),
}


@DEPTH
@pytest.mark.parametrize("case", list(DEEP_BODIES))
def test_deep_nesting_is_a_422_naming_the_field_and_the_limit(env, case, depth):
    worker_id, job = _running(env)
    op, body, field = DEEP_BODIES[case]
    before = _snapshot(env)
    client, path = (env.admin, "/grids") if op == "grids" else (env.worker, _worker_path(worker_id, op))
    reply = _post(client, path, _text(body, depth, job))
    _refused(reply, 422, field, "nested deeper than 64 levels")
    assert _snapshot(env) == before


def test_nesting_beyond_the_parsers_own_limit_is_a_422_that_says_the_limit(env):
    """orjson stops at 1024 levels, before our walk can name the field: the reply still says what is wrong."""
    before = _snapshot(env)
    reply = _post(env.admin, "/grids", _text(_grid(config={"x": "@DEEP@"}), depth=5000))
    _refused(reply, 422, "body", "nest at most 64 levels")
    assert _snapshot(env) == before


def test_a_config_nested_just_within_the_limit_is_stored_and_read_back(env):
    spec = {**_grid(), "trainer": "command", "config": {"command": ["true"], "config": {"x": "@DEEP@"}}}
    reply = _post(env.admin, "/grids", _text(spec, depth=60))  # 63 levels from the body's root
    assert reply.status_code == 201, reply.text
    results = env.admin.get(f"/grids/{spec['name']}/results")
    assert results.status_code == 200, results.text
    job = env.admin.get(f"/jobs/{results.json()['results'][0]['job_id']}").json()
    depth, node = 0, job["config"]["config"]["x"]
    while isinstance(node, dict):
        depth, node = depth + 1, node["a"]
    assert depth == 60


# ---- huge bodies --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["grids", "heartbeat"])
def test_a_body_over_16_mib_is_a_413(env, op):
    worker_id, job = _running(env)
    filler = "x" * (17 * 2**20)
    if op == "grids":
        client, path, body = env.admin, "/grids", _grid(config={"seconds": 0.01, "blob": filler})
    else:
        client, path, body = env.worker, _worker_path(worker_id, op), {**FENCE, "events": [
            {"kind": "log", "message": filler}]}
    before = _snapshot(env)
    try:
        reply = _post(client, path, _text(body, job=job))
    except httpx.WriteError:  # the server may answer and close before the client wrote it all
        pytest.fail("the server closed the connection instead of answering 413")
    _refused(reply, 413, "", "larger than 16 MiB")
    assert _snapshot(env) == before


# ---- the fence first: a stale write with an acceptable odd body is a 409 --------------------------------
@pytest.mark.parametrize("odd", ["deep", "nul", "surrogate"])
def test_a_stale_finish_or_heartbeat_with_an_odd_body_is_a_409(env, odd):
    worker_id, job = _running(env)
    value = {"deep": "@DEEP@", "nul": NUL, "surrogate": SURROGATE}[odd]
    stale = {"job_id": job["id"], "attempt_id": "0" * 32}
    before = _snapshot(env)
    for op, body in (("finish", {**stale, "outcome": "succeeded", "result": {"x": value}}),
                     ("heartbeat", {**stale, "metrics": [{"step": 1, "values": {"x": value}}]})):
        reply = _post(env.worker, _worker_path(worker_id, op), _text(body, depth=60))
        assert reply.status_code == 409, reply.text
        assert reply.json()["error"]["code"] == "stale_attempt" and reply.json()["stop"] is True
    assert _snapshot(env) == before


# ---- free text: repaired, said so, readable ---------------------------------------------------------------
def _events(env: Env, job_id: int) -> list[dict]:
    reply = env.admin.get(f"/jobs/{job_id}/events")
    assert reply.status_code == 200, reply.text
    return reply.json()["events"]


@BAD
def test_a_bad_metric_value_or_name_is_repaired_and_the_heartbeat_extends_the_lease(env, bad):
    worker_id, job = _running(env)
    body = {**FENCE, "step": 3, "metrics": [{"step": 3, "values": {"loss": 0.5, "note": bad, bad: 1.0}}],
            "events": [{"kind": "log", "message": bad}]}
    reply = _post(env.worker, _worker_path(worker_id, "heartbeat"), _text(body, job=job))
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["ok"] is True and answer["lease_expires_at"] > job["lease_expires_at"]
    assert set(answer["cleaned"]["fields"]) == {"metrics.0.values.note", "metrics.0.values.a\ufffdb (key)"}
    metrics = env.admin.get(f"/jobs/{job['id']}/metrics").json()["metrics"]
    assert [(m["loss"], m["note"], m["a\ufffdb"]) for m in metrics] == [(0.5, "a\ufffdb", 1.0)]
    events = _events(env, job["id"])
    assert [e["message"] for e in events if e["kind"] == "log"] == ["a\ufffdb"]
    cleaned = [e["message"] for e in events if e["kind"] == "input_cleaned"]
    assert len(cleaned) == 1 and "metrics.0.values.note" in cleaned[0] and "U+FFFD" in cleaned[0]
    assert env.admin.get(f"/jobs/{job['id']}").json()["step"] == 3


@BAD
def test_a_bad_result_or_error_is_repaired_and_the_job_finishes_once(env, bad):
    worker_id, job = _running(env)
    reply = _post(env.worker, _worker_path(worker_id, "finish"),
                  _text({**FENCE, "outcome": "succeeded", "result": {"loss": 0.1, "tag": bad}}, job=job))
    assert reply.status_code == 200, reply.text
    detail = env.admin.get(f"/jobs/{job['id']}").json()
    assert detail["state"] == "succeeded" and detail["result"] == {"loss": 0.1, "tag": "a\ufffdb"}
    assert detail["attempts"] == 1
    assert any(e["kind"] == "input_cleaned" and "result.tag" in e["message"] for e in _events(env, job["id"]))
    again = _post(env.worker, _worker_path(worker_id, "finish"),
                  _text({**FENCE, "outcome": "succeeded", "result": {"tag": bad}}, job=job))
    assert again.status_code == 409, again.text  # once

    worker_id, job = _running(env)
    reply = _post(env.worker, _worker_path(worker_id, "finish"),
                  _text({**FENCE, "outcome": "error", "error": f"Traceback: {bad}"}, job=job))
    assert reply.status_code == 200, reply.text
    assert env.admin.get(f"/jobs/{job['id']}").json()["last_error"] == "Traceback: a\ufffdb"


@BAD
def test_bad_characters_in_event_messages_are_repaired(env, bad):
    worker_id, job = _running(env)
    reply = _post(env.worker, _worker_path(worker_id, "events"),
                  _text({**FENCE, "events": [{"kind": "output", "message": f"tail {bad}"}]}, job=job))
    assert reply.status_code == 200, reply.text
    assert [e["message"] for e in _events(env, job["id"]) if e["kind"] == "output"] == ["tail a\ufffdb"]
    reply = _post(env.worker, _worker_path(worker_id, "worker_events"),
                  _text({"kind": "self_update_failed", "message": f"git said {bad}"}))
    assert reply.status_code == 200, reply.text
    events = env.admin.get(f"/workers/{worker_id}/events").json()["events"]
    assert [e["message"] for e in events] == ["git said a\ufffdb"]


def test_a_metric_nested_too_deep_is_named_even_behind_a_lone_surrogate(env):
    """orjson refuses a lone surrogate before it sees the rest; the body is parsed again to name the field."""
    worker_id, job = _running(env)
    body = {**FENCE, "metrics": [{"step": 1, "values": {"note": SURROGATE, "x": "@DEEP@"}}]}
    reply = _post(env.worker, _worker_path(worker_id, "heartbeat"), _text(body, depth=100, job=job))
    _refused(reply, 422, "metrics", "nested deeper than 64 levels")


def test_grid_names_in_a_path_never_reach_the_database_with_bad_characters(env):
    for name in ("a%00b", "a%ED%A0%80b"):
        reply = env.admin.get(f"/grids/{name}")
        assert reply.status_code == 404, reply.text
        assert re.search("no grid named", reply.json()["error"]["message"]), reply.text


def test_a_lone_surrogate_stored_by_an_older_version_reads_back_repaired(env):
    """Rows written before these checks may hold one (both databases' JSON columns keep the escape)."""
    _, job = _running(env)
    with env.engine.begin() as conn:
        conn.execute(t.metrics.insert().values(job_id=job["id"], attempt_id=job["attempt_id"], step=7, time=1.0,
                                               values={"note": SURROGATE}))
    reply = env.admin.get(f"/jobs/{job['id']}/metrics")
    assert reply.status_code == 200, reply.text
    assert [m["note"] for m in reply.json()["metrics"]] == ["a\ufffdb"]
