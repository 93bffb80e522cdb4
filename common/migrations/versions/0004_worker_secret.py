"""workers.secret_hash: a worker's writes are bound to the registration that claimed the job

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("secret_hash", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("secret_hash")
