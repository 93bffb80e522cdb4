"""ix_jobs_gang holds only queued jobs that have a fuse key

A gang claim reads ix_jobs_gang only for the members of a first job that has a fuse key (`fuse_key =
first.fuse_key`); a job without one gangs only itself and is claimed through ix_jobs_claim. Those jobs (every
trainer without a fuse_key hook: noop, command, ...) were in the index all the same, and on SQLite every claim
of one deleted its entry: one B-tree page more in each cycle's commit, 3-5 us of an 85 us cycle
(bench/README.md, issue 15).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

RANK = sa.text("(-priority)")


def _gang_index(where: str) -> None:
    op.drop_index("ix_jobs_gang", table_name="jobs")
    op.create_index("ix_jobs_gang", "jobs", ["grid_id", "fuse_key", RANK, "id"], postgresql_where=sa.text(where),
                    sqlite_where=sa.text(where))


def upgrade() -> None:
    _gang_index("state = 'queued' AND fuse_key IS NOT NULL")


def downgrade() -> None:
    _gang_index("state = 'queued'")
