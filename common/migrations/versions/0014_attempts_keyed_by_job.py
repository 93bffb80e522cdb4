"""attempts keyed by (job_id, id): one B-tree instead of three on SQLite, one index instead of two on Postgres

Every claim inserts an attempt row and every finish updates one. On SQLite the table was a rowid table with two
indexes beside it (the primary key on id, ix_attempts_job on job_id), so each cycle's commit wrote three pages
for the attempt alone: a WAL frame each. Keyed by (job_id, id) WITHOUT ROWID, the rows are the key's B-tree,
in claim order (about job order), and a cycle's attempt writes land on one page: 6.5 -> 4.5 frames a cycle,
13-16 us of a 100-116 us cycle of raw statements (bench/README.md, issue 15). A job's attempts are read by
job_id (its history), which the key's prefix serves; every write of one names its job too.

No foreign key to jobs: jobs are never deleted (as for grids.parent_id, migration 0005), and the claim inserts
the attempt of the row it has just updated and locked, in the same statement or transaction, so the key's
check on Postgres (a trigger per insert) and on SQLite (a lookup per insert) did no work.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

COLUMNS = "id, job_id, worker_id, outcome, started_at, ended_at, code_rev, error"


def _attempt_columns(job_id_references_jobs: bool) -> list[sa.Column]:
    job_id = [sa.ForeignKey("jobs.id", ondelete="CASCADE")] if job_id_references_jobs else []
    return [
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.Integer, *job_id, nullable=False),
        sa.Column("worker_id", sa.String(32)),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("code_rev", sa.String(100)),
        sa.Column("error", sa.Text),
    ]


def _rebuild_sqlite(key: list[str], old_shape: bool) -> None:
    """SQLite changes neither a table's key nor its rowid in place: copy the rows into a new table."""
    op.create_table("attempts_new", *_attempt_columns(old_shape), sa.PrimaryKeyConstraint(*key),
                    sqlite_with_rowid=old_shape)
    op.execute(f"INSERT INTO attempts_new ({COLUMNS}) SELECT {COLUMNS} FROM attempts")
    op.drop_table("attempts")  # nothing references attempts: no cascade
    op.rename_table("attempts_new", "attempts")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_attempts_job", table_name="attempts")
        _rebuild_sqlite(["job_id", "id"], old_shape=False)
        return
    op.drop_constraint("attempts_job_id_fkey", "attempts", type_="foreignkey")
    op.drop_constraint("attempts_pkey", "attempts", type_="primary")
    op.create_primary_key("attempts_pkey", "attempts", ["job_id", "id"])
    op.drop_index("ix_attempts_job", table_name="attempts")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(["id"], old_shape=True)
    else:
        op.drop_constraint("attempts_pkey", "attempts", type_="primary")
        op.create_primary_key("attempts_pkey", "attempts", ["id"])
        op.create_foreign_key("attempts_job_id_fkey", "attempts", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
    op.create_index("ix_attempts_job", "attempts", ["job_id"])
