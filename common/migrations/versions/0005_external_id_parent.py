"""jobs.external_id (the id a trainer's users know a config by, searchable) and grids.parent_id
(the grid a refined grid came from)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("external_id", sa.String(200)))
    op.create_index("ix_jobs_external_id", "jobs", ["external_id"])
    with op.batch_alter_table("grids") as batch:
        # No foreign key: on SQLite adding one rebuilds the table, and dropping the old grids table would
        # cascade to every job. Grids are never deleted, and the scheduler checks the parent exists.
        batch.add_column(sa.Column("parent_id", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("grids") as batch:
        batch.drop_column("parent_id")
    op.drop_index("ix_jobs_external_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("external_id")
