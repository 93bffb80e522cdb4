"""jobs.store: the checkpoint store a grid chose for its jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("store", sa.String(300)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("store")
