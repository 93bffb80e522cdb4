"""worker_events: what happened to a worker outside any job (self-update, rollback, refused dirty tree)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("worker_id", sa.String(32), sa.ForeignKey("workers.id", ondelete="CASCADE"), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_index("ix_worker_events_worker", "worker_events", ["worker_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_worker_events_worker", table_name="worker_events")
    op.drop_table("worker_events")
