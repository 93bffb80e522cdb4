"""ix_grids_state on grids (id, state): a claim checks its job's grid is active without reading the grid's row

SQLite's claim looks up the claimed job's grid (`EXISTS (SELECT 1 FROM grids WHERE grids.id = jobs.grid_id AND
grids.state = 'active')`). The state column comes after `spec`, the grid as posted, which for a large grid is
most of a megabyte (889 KB for 100,000 axis values) kept in a chain of overflow pages, and SQLite walks that
chain to reach any column after it: 9-12 us of a 50 us claim for such a grid, on every claim. The claim reads
this covering index instead (INDEXED BY), whatever the spec's size. Grids change state rarely, so the index
costs nothing on the hot path. Postgres keeps large values out of the row (TOAST), and has the index only so
both databases have one schema.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_grids_state", "grids", ["id", "state"])


def downgrade() -> None:
    op.drop_index("ix_grids_state", table_name="grids")
