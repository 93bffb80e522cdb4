"""jobs.fuse_key (jobs of a grid sharing it can be claimed as one gang and trained as one stacked model)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("fuse_key", sa.String(200)))
    op.create_index("ix_jobs_gang", "jobs", ["grid_id", "fuse_key", "state", sa.text("priority DESC"), "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_gang", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fuse_key")
