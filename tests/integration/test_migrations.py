"""The Alembic migrations create exactly the tables in common/schema.py, on SQLite and Postgres."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, inspect, text

from common.db import migrate
from common.schema import metadata


def test_migrated_database_matches_the_schema(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        if conn.dialect.name == "sqlite":
            # SQLAlchemy cannot reflect SQLite's expression indexes (none at head; ix_jobs_claim had one): compare
            # those by name and definition here instead.
            stored = dict(conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index'")).all())
            expression = [d for d in diff if d[0] == "add_index" and any(
                not isinstance(e, Column) for e in d[1].expressions)]
            for _, index in expression:
                assert index.name in stored, f"{index.name} is not in the database"
                assert "-priority" in stored[index.name].replace(" ", "") and "state='queued'" in \
                    stored[index.name].replace(" ", ""), stored[index.name]
            diff = [d for d in diff if d not in expression]
    assert diff == [], f"migrations and common/schema.py disagree: {diff}"


def test_migrate_is_idempotent_and_keeps_data(db_url, engine):
    from sqlalchemy import insert, select

    from common import schema as t

    with engine.begin() as conn:
        conn.execute(insert(t.tokens).values(name="x", role="admin", token_hash="h" * 64, created_at=1.0,
                                             revoked=False))
    migrate(db_url)  # again: nothing to do, nothing lost
    with engine.connect() as conn:
        assert conn.execute(select(t.tokens.c.name)).scalars().all() == ["x"]
    assert {"grids", "jobs", "attempts", "workers", "metrics", "events", "tokens", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )


def test_0005_keeps_grids_and_jobs_made_before_it(db_url):
    """external_id and parent_id arrive empty on a database with jobs in it; the grid keeps its jobs."""
    from alembic import command
    from sqlalchemy import select, text

    from common.db import alembic_config, make_engine

    command.downgrade(alembic_config(db_url), "0004")  # the fixture's database is at head already
    assert "external_id" not in {c["name"] for c in inspect(make_engine(db_url)).get_columns("jobs")}
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO grids (name, trainer, spec, priority, max_attempts, state, created_at, "
                              "updated_at) VALUES ('old', 'noop', '{}', 0, 3, 'active', 1, 1)"))
            conn.execute(text("INSERT INTO jobs (grid_id, key, trainer, config, seed, priority, gpus, resources, "
                              "state, not_before, cancel_requested, max_attempts, attempts, errors, losses, "
                              "preemptions, created_at) SELECT id, 'k', 'noop', '{}', 0, 0, 0, '{}', 'queued', 0, "
                              "false, 3, 0, 0, 0, 0, 1 FROM grids"))
        migrate(db_url)
        from common import schema as t

        with engine.connect() as conn:
            assert conn.execute(select(t.grids.c.name, t.grids.c.parent_id)).all() == [("old", None)]
            assert conn.execute(select(t.jobs.c.key, t.jobs.c.external_id)).all() == [("k", None)]
    finally:
        engine.dispose()


def test_0014_keys_attempts_by_job_and_keeps_every_attempt_down_and_up(db_url):
    """Attempts keyed by (job_id, id), without the foreign key and ix_attempts_job (on SQLite a WITHOUT ROWID
    table); a downgrade brings the old key back. Rows survive both ways, and the queue writes them after."""
    from alembic import command
    from sqlalchemy import select

    from common import schema as t
    from common.db import alembic_config, make_engine
    from scheduler.grids import submit_grid
    from scheduler.queue import Queue
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    def shape(engine) -> dict:
        found = inspect(engine)
        stored = {"key": found.get_pk_constraint("attempts")["constrained_columns"],
                  "foreign keys": [fk["referred_table"] for fk in found.get_foreign_keys("attempts")],
                  "indexes": sorted(i["name"] for i in found.get_indexes("attempts"))}
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'attempts'")).scalar()
            stored["without rowid"] = "WITHOUT ROWID" in sql.upper()
        return stored

    def attempts(engine) -> list:
        with engine.connect() as conn:
            return conn.execute(select(t.attempts).order_by(t.attempts.c.job_id, t.attempts.c.id)).all()

    engine = make_engine(db_url)
    queue = Queue(engine)
    submit_grid(engine, GridSpec.model_validate({"name": "m", "trainer": "noop", "axes": {"value": [1.0, 2.0, 3.0]}}),
                validate_config)
    worker = queue.register_worker("w", "h", ["noop"])
    first = queue.claim(worker, trainers=["noop"])
    reply, running = queue.finish_and_claim(first.id, first.attempt_id, "succeeded", {"loss": 1.0},
                                            worker_id=worker, trainers=["noop"])
    assert reply.ok and running is not None
    before = attempts(engine)
    assert [(a.job_id, a.outcome) for a in before] == [(first.id, "succeeded"), (running.id, "running")]
    new_shape = {"key": ["job_id", "id"], "foreign keys": [], "indexes": []}
    sqlite = engine.dialect.name == "sqlite"
    assert shape(engine) == {**new_shape, **({"without rowid": True} if sqlite else {})}
    queue.close()
    engine.dispose()

    command.downgrade(alembic_config(db_url), "0013")
    engine = make_engine(db_url)
    assert shape(engine) == {"key": ["id"], "foreign keys": ["jobs"], "indexes": ["ix_attempts_job"],
                             **({"without rowid": False} if sqlite else {})}
    assert attempts(engine) == before
    engine.dispose()

    migrate(db_url)
    engine = make_engine(db_url)
    queue = Queue(engine)
    assert shape(engine) == {**new_shape, **({"without rowid": True} if sqlite else {})}
    assert attempts(engine) == before
    assert queue.finish(running.id, running.attempt_id, "succeeded", {"loss": 2.0}, worker_id=worker).ok
    assert [a.outcome for a in attempts(engine)] == ["succeeded", "succeeded"]
    queue.close()
    engine.dispose()
