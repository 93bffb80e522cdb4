"""searches and search_trials: a grid's `search:` (its trials tied to jobs, and the lease on asking)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "searches",
        sa.Column("grid_id", sa.Integer, sa.ForeignKey("grids.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("lock_owner", sa.String(32)),
        sa.Column("lock_until", sa.Float, nullable=False),
        sa.Column("wake", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "search_trials",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("grid_id", sa.Integer, sa.ForeignKey("grids.id", ondelete="CASCADE"), nullable=False),
        sa.Column("point", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE")),
        sa.Column("duplicate", sa.Boolean, nullable=False),
        sa.Column("told", sa.String(20)),
        sa.Column("value", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("grid_id", "point", "number", name="uq_search_trials_number"),
    )
    op.create_index("ix_search_trials_grid_told", "search_trials", ["grid_id", "told"])
    op.create_index("ix_search_trials_job", "search_trials", ["job_id"])


def downgrade() -> None:
    op.drop_table("search_trials")
    op.drop_table("searches")
