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
            # SQLAlchemy cannot reflect SQLite's expression indexes (ix_jobs_claim, ix_jobs_gang): compare
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
