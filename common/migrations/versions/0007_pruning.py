"""Early stopping: jobs.pruned_step / pruned_by / prune_exempt and the prune_rungs table (scheduler/pruning.py)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pruned_step", sa.Integer()))
        batch.add_column(sa.Column("pruned_by", sa.Text()))
        batch.add_column(sa.Column("prune_exempt", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "prune_rungs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("grid_id", sa.Integer(), sa.ForeignKey("grids.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rung", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.UniqueConstraint("job_id", "rung", name="uq_prune_rungs_job_rung"),
    )
    op.create_index("ix_prune_rungs_grid", "prune_rungs", ["grid_id", "rung"])


def downgrade() -> None:
    op.drop_index("ix_prune_rungs_grid", table_name="prune_rungs")
    op.drop_table("prune_rungs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("prune_exempt")
        batch.drop_column("pruned_by")
        batch.drop_column("pruned_step")
