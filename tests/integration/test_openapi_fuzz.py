"""Property-based fuzz of the whole OpenAPI with schemathesis: no input gives a server error.

The real app (api.app.create_app) runs in-process through schemathesis' ASGI client, on a real Postgres
(and SQLite, with fewer examples). Every operation gets a bounded number of generated requests with a valid
admin token (admin may call every endpoint). Path parameters are real: a grid, one of its jobs and a
registered worker made before the fuzz; fenced worker bodies carry the attempt of a job that is really
running every other call, so fuzzed metrics, pointers and results reach the database's insert, not just
the fence. The only check is schemathesis' `not_a_server_error` (no 5xx): our replies to bad input are
4xx by design and are checked by name in tests/e2e/test_bad_input.py.
"""
from __future__ import annotations

import itertools
import secrets

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from sqlalchemy import select

from api.app import create_app
from api.worker_secrets import HEADER as WORKER_SECRET_HEADER
from common import schema as t
from common.db import migrate
from common.settings import Settings
from conftest import fresh_postgres

EXAMPLES = {"postgres": 30, "sqlite": 8}  # per operation; the whole fuzz stays near a minute on 2 busy cores
FENCED = ("heartbeat", "checkpoint", "events", "finish", "code_rev")


class World:
    """Real ids for the fuzzed requests, and a running job whose attempt fenced bodies may carry."""

    def __init__(self, client, backend: str, engine):
        self.client, self.backend, self.engine = client, backend, engine
        self.calls = itertools.count()
        ok = self._ok
        ok(client.post("/api/v1/grids", json={"name": "fuzz-target", "trainer": "sleep",
                                              "axes": {"seconds": [0.1, 0.2]}}))
        grid = ok(client.post("/api/v1/grids", json={"name": "fuzz-work", "trainer": "sleep",
                                                     "axes": {"seconds": [i / 100 for i in range(1, 400)]}}))
        self.work_grid = grid["grid_id"]
        self.grid = "fuzz-target"
        self.job_id = ok(client.get("/api/v1/grids/fuzz-target/results"))["results"][0]["job_id"]
        registered = ok(client.post("/api/v1/workers/register", json={"name": "fuzz", "host": "h"}))
        self.worker_id, self.worker_secret = registered["worker_id"], registered["worker_secret"]
        client.headers[WORKER_SECRET_HEADER] = self.worker_secret  # World's own claims
        self.running = None
        self.claims = 0

    @staticmethod
    def _ok(reply):
        assert reply.status_code < 400, reply.text
        return reply.json()

    def attempt(self) -> dict | None:
        """A job of the work grid that is running now, claimed by our worker (None when all are used)."""
        if self.running is not None:
            with self.engine.connect() as conn:
                state = conn.execute(select(t.jobs.c.state, t.jobs.c.attempt_id)
                                     .where(t.jobs.c.id == self.running["id"])).first()
            if state is None or state.state != "running" or state.attempt_id != self.running["attempt_id"]:
                self.running = None
        if self.running is None:
            reply = self.client.post(f"/api/v1/workers/{self.worker_id}/claim", json={"grid_id": self.work_grid})
            self.running = self._ok(reply)["job"]
            self.claims += 1
        return self.running

    def fill(self, case) -> None:
        """Real path parameters always; the real attempt in every other fenced body."""
        real = {"grid": self.grid, "job_id": self.job_id, "worker_id": self.worker_id}
        for name in list(case.path_parameters or {}):
            if name in real:
                case.path_parameters[name] = real[name]
        operation = case.operation.path.rsplit("/", 1)[-1]
        if "worker_id" in real and "{worker_id}" in case.operation.path and next(self.calls) % 4:
            # The real secret on most calls, so the bodies get past the registration check; the rest keep
            # what was generated (a wrong or missing secret must be a 403, never a 500).
            case.headers = {**(case.headers or {}), WORKER_SECRET_HEADER: self.worker_secret}
        if operation in FENCED and isinstance(case.body, dict) and next(self.calls) % 2 == 0:
            running = self.attempt()
            if running is not None:
                case.body["job_id"], case.body["attempt_id"] = running["id"], running["attempt_id"]


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def fuzz_app(request, tmp_path_factory):
    backend = request.param
    drop = None
    if backend == "postgres":
        url, drop = fresh_postgres(request.getfixturevalue("pg_template"))
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'gridfleet.db'}"
        migrate(url)
    token = "gf_fuzz_admin_" + secrets.token_hex(16)
    app = create_app(Settings(database_url=url, admin_token=token, lease_seconds=600.0))
    from starlette.testclient import TestClient

    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    world = World(client, backend, app.state.engine)
    yield app, token, world
    client.close()
    app.state.queue.close()
    app.state.engine.dispose()
    if drop:
        drop()


def _fuzz(operation, mode, examples: int, token: str, world: World) -> list[str]:
    """Run `examples` generated requests against one operation; the server errors found (as text)."""
    failures: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        world.fill(case)
        try:
            case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error])
        except AssertionError as exc:  # schemathesis' FailureGroup: keep going, report them all
            failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")

    try:
        run()
    except Unsatisfiable:  # negative mode on an operation with nothing to get wrong (e.g. GET /healthz)
        assert mode is GenerationMode.NEGATIVE, operation.label
    return failures


def test_no_server_error_for_any_generated_request(fuzz_app):
    app, token, world = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]  # the whole API, not a part that loaded
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += _fuzz(operation, mode, EXAMPLES[world.backend], token, world)
    assert world.claims >= 1  # fenced bodies really carried a running attempt
    assert not failures, "\n\n".join(failures)
