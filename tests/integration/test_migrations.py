"""The Alembic migrations create exactly the tables in common/schema.py, on SQLite and Postgres."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from common.db import migrate
from common.schema import metadata


def test_migrated_database_matches_the_schema(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
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
