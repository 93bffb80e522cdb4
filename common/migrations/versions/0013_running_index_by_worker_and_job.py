"""ix_jobs_running keyed by (worker_id, id): a fenced write finds its job in 3 pages, not among dead entries

The fenced UPDATE of every finish and heartbeat (`WHERE id = ... AND worker_id = ... AND state = 'running'`)
reads ix_jobs_running when the planner's statistics say few jobs run (they are taken when a grid is
submitted, before any runs). Keyed by worker_id alone, that scan read every entry the worker's finished jobs
left in the index, which only a VACUUM removes: 3 pages at the start, 101 after 15,000 jobs of one worker
(auto_explain, bench/README.md, issue 15). With the job's id in the key it descends straight to the one
entry whatever the statistics say. Postgres without deduplication, as in 0011.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

RUNNING = sa.text("state = 'running'")


def _running_index(columns: list[str]) -> None:
    op.drop_index("ix_jobs_running", table_name="jobs")
    op.create_index("ix_jobs_running", "jobs", columns, postgresql_where=RUNNING, sqlite_where=RUNNING,
                    postgresql_with={"deduplicate_items": "off"})


def upgrade() -> None:
    _running_index(["worker_id", "id"])


def downgrade() -> None:
    _running_index(["worker_id"])
