"""Claims at grid scale: indexes that hold only claimable (queued) or running jobs, and room for HOT updates

- ix_jobs_claim and ix_jobs_gang hold queued jobs only, keyed by (-priority, id): a claim can start its index
  scan at a row comparison (scheduler/queue.py's claim floor) instead of walking the entries that claims left
  behind since the last VACUUM. The predicate lists the claimable state, so any other state (a new terminal
  one included) is not in them.
- ix_jobs_lease (state, lease_expires_at) is replaced by ix_jobs_running (worker_id) of running jobs: the
  lease, the step and the progress are in no index, so a heartbeat's update can stay HOT.
- ix_jobs_external_id holds only jobs that have an external id.
- Postgres: jobs get fillfactor 70, so the updated row of a claim, heartbeat or finish fits on its page.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

QUEUED = sa.text("state = 'queued'")
RUNNING = sa.text("state = 'running'")
RANK = sa.text("(-priority)")  # ascending rank = descending priority: row comparisons follow index order


def upgrade() -> None:
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_index("ix_jobs_gang", table_name="jobs")
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.drop_index("ix_jobs_external_id", table_name="jobs")
    op.create_index("ix_jobs_claim", "jobs", [RANK, "id"], postgresql_where=QUEUED, sqlite_where=QUEUED)
    op.create_index("ix_jobs_gang", "jobs", ["grid_id", "fuse_key", RANK, "id"], postgresql_where=QUEUED,
                    sqlite_where=QUEUED)
    op.create_index("ix_jobs_running", "jobs", ["worker_id"], postgresql_where=RUNNING, sqlite_where=RUNNING)
    has_external_id = sa.text("external_id IS NOT NULL")
    op.create_index("ix_jobs_external_id", "jobs", ["external_id"], postgresql_where=has_external_id,
                    sqlite_where=has_external_id)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs SET (fillfactor = 70)")  # new pages only; old ones fill as before


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
    op.drop_index("ix_jobs_external_id", table_name="jobs")
    op.drop_index("ix_jobs_running", table_name="jobs")
    op.drop_index("ix_jobs_gang", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.create_index("ix_jobs_external_id", "jobs", ["external_id"])
    op.create_index("ix_jobs_lease", "jobs", ["state", "lease_expires_at"])
    op.create_index("ix_jobs_gang", "jobs", ["grid_id", "fuse_key", "state", sa.text("priority DESC"), "id"])
    op.create_index("ix_jobs_claim", "jobs", ["state", sa.text("priority DESC"), "id"])
