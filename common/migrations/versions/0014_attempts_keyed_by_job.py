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


def _rebuild_sqlite(key: list[str], with_rowid: bool, references_jobs: bool) -> None:
    """SQLite changes neither a table's key nor its rowid in place: copy the rows into a new table of the same
    columns (as stored) and drop the old one (nothing references attempts: the drop cascades nowhere)."""
    bind = op.get_bind()
    stored = sa.MetaData()
    old = sa.Table("attempts", stored, autoload_with=bind, resolve_fks=False)
    # The key's DDL names only jobs.id: a table of that one column stands for jobs.
    jobs_id = sa.Table("jobs", stored, sa.Column("id", sa.Integer, primary_key=True)).c.id
    keys = [sa.ForeignKeyConstraint(["job_id"], [jobs_id], ondelete="CASCADE")] if references_jobs else []
    new = sa.Table("attempts_new", stored, *(sa.Column(c.name, c.type, nullable=c.nullable) for c in old.columns),
                   sa.PrimaryKeyConstraint(*key), *keys, sqlite_with_rowid=with_rowid)
    new.create(bind)
    bind.execute(new.insert().from_select([c.name for c in old.columns], sa.select(old)))
    op.drop_table("attempts")
    op.rename_table("attempts_new", "attempts")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_attempts_job", table_name="attempts")
        _rebuild_sqlite(["job_id", "id"], with_rowid=False, references_jobs=False)
        return
    op.drop_constraint("attempts_job_id_fkey", "attempts", type_="foreignkey")
    op.drop_constraint("attempts_pkey", "attempts", type_="primary")
    op.create_primary_key("attempts_pkey", "attempts", ["job_id", "id"])
    op.drop_index("ix_attempts_job", table_name="attempts")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(["id"], with_rowid=True, references_jobs=True)
    else:
        op.drop_constraint("attempts_pkey", "attempts", type_="primary")
        op.create_primary_key("attempts_pkey", "attempts", ["id"])
        op.create_foreign_key("attempts_job_id_fkey", "attempts", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
    op.create_index("ix_attempts_job", "attempts", ["job_id"])
