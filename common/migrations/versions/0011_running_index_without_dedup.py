"""Postgres: ix_jobs_running without B-tree deduplication, so the entries that finished jobs leave are removed

ix_jobs_running is keyed by worker_id alone: a worker's running job and the dead entries of the jobs it ran
before share one key, and Postgres' deduplication merges them into one posting list. A posting list is marked
dead only when all of its entries are, and the live running job is in it, so nothing was ever removed between
VACUUMs: with four workers cycling through finish_and_claim the expiry scan read 5 pages at the start and 377
after 20,000 jobs; without deduplication, 6 and 28 (bench/README.md, issue 15). SQLite does not deduplicate.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER INDEX ix_jobs_running SET (deduplicate_items = off)")
        op.execute("REINDEX INDEX ix_jobs_running")  # posting lists already written stay until a rebuild


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER INDEX ix_jobs_running RESET (deduplicate_items)")
