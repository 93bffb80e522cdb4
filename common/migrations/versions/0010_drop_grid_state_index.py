"""Drop ix_jobs_grid_state: every claim and finish inserted into it, and no hot query needs it

Each claim and each finish is a non-HOT update of the job row (`state` is in the partial indexes' predicates),
so it inserts into every full index of jobs: the primary key, uq_jobs_grid_key and ix_jobs_grid_state, two of
those inserts per job for this index alone. The queries that read a grid's jobs by state are served without it:
a grid's counts and its succeeded jobs by uq_jobs_grid_key's grid_id prefix or a scan of jobs, its running jobs
by ix_jobs_running, its queued ones by ix_jobs_gang (bench/README.md, issue 15: the counts of a 100,000-job grid
take about 50 ms instead of 14 on Postgres, in a grid_summary of 700-850 ms; 250 ms instead of 25 on SQLite).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_grid_state", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_grid_state", "jobs", ["grid_id", "state"])
