"""Shared fixtures: every database test runs on SQLite and on a real Postgres.

Postgres: GRIDFLEET_TEST_POSTGRES_URL (default: the local server, user postgres, trust auth). Each test
gets a fresh database copied from a migrated template. In CI (CI=true) an unreachable Postgres is an
error, never a skip.
"""
from __future__ import annotations

import os
import tempfile
import uuid

# huggingface_hub reads these at import: no Xet, no telemetry, no token or cache from the developer's home.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="gridfleet-hf-home-"))

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from common.db import make_engine, migrate, normalize_url
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue

PG_ADMIN_URL = normalize_url(os.environ.get("GRIDFLEET_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pg_admin():
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def pg_template():
    """A migrated template database, made once per test session."""
    name = f"gf_tpl_{os.getpid()}"
    try:
        admin = _pg_admin()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means "no Postgres here"
        message = f"Postgres not reachable at {make_url(PG_ADMIN_URL).render_as_string(hide_password=True)}: {exc}"
        if IN_CI:
            pytest.fail(message + " (CI must run the Postgres tests)")
        pytest.skip(message)
    template_url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate(template_url)
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def fresh_postgres(template: str):
    """A new database copied from the migrated template: (url, drop)."""
    name = f"gf_t_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop():
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A migrated, empty database URL; the test runs once per backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gridfleet.db'}"
        migrate(url)
        yield url
    else:
        url, drop = fresh_postgres(request.getfixturevalue("pg_template"))
        yield url
        drop()


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def policy():
    return RetryPolicy(lease_seconds=30.0, backoff_base_seconds=5.0)


@pytest.fixture
def queue(engine, policy):
    return Queue(engine, policy)


@pytest.fixture
def fleet(tmp_path):
    """Real `gridfleet serve` / `gridfleet worker` processes for one test (tests/e2e/processes.py); all of
    them are killed at teardown."""
    from tests.e2e.processes import Fleet

    fleet = Fleet(tmp_path)
    yield fleet
    fleet.close()


@pytest.fixture
def start_hub():
    """Start local Hub-compatible servers (tests/hub_server.py): start_hub(token, read_token=None)."""
    from tests.hub_server import HubServer

    servers = []

    def start(token: str, read_token: str | None = None) -> HubServer:
        servers.append(HubServer(token, read_token=read_token).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def pg_cluster():
    """A Postgres server of this test session's own (tests/pgcluster.py), for tests that stop, restart or
    crash it. A test that stops it starts it again; it is removed at the end of the session."""
    from tests.pgcluster import PgCluster, PgClusterUnavailable

    try:
        cluster = PgCluster()
    except PgClusterUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc} (CI must run the Postgres restart tests)")
        pytest.skip(str(exc))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def private_pg_url(pg_cluster):
    """A new empty database on the session's own Postgres server (running when the test starts)."""
    if not pg_cluster.running():
        pg_cluster.start()
    return pg_cluster.create_database(f"gf_p_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def start_agent():
    """start_agent(client, home, trainers, ...) -> tests.agents.Running: a real Agent in a thread; each one
    started is stopped at teardown."""
    from tests.agents import Running
    started: list[Running] = []

    def start(*args, **kwargs) -> Running:
        started.append(Running(*args, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()
