"""Database tables (SQLAlchemy Core). Times are unix seconds (float) so SQLite and Postgres compare alike.

The Alembic migrations in common/migrations must create exactly these tables; a test checks that.
"""
from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

grids = Table(
    "grids",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("trainer", String(100), nullable=False),
    Column("spec", JSON, nullable=False),  # the grid spec as last posted
    Column("objective", String(200)),  # e.g. "min:loss"
    Column("priority", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("state", String(20), nullable=False, default="active"),  # active | paused | cancelled
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # The grid this one was refined from (`gridfleet refine`); NULL for a grid of its own. No foreign key
    # (see migration 0005); submit_grid checks the parent exists.
    Column("parent_id", Integer),
    # A claim's check that its job's grid is active, read without the row (migration 0015).
    Index("ix_grids_state", "id", "state"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("grid_id", Integer, ForeignKey("grids.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(64), nullable=False),  # sha256 of canonical {trainer, config, seed}
    Column("trainer", String(100), nullable=False),
    Column("config", JSON, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("gpus", Float, nullable=False, default=0.0),  # fraction of one GPU the job needs
    Column("resources", JSON, nullable=False),
    Column("code_rev", String(100)),
    Column("store", String(300)),  # checkpoint store for new checkpoints ("local", "hf://..."); NULL: the worker's
    Column("state", String(20), nullable=False, default="queued"),
    Column("not_before", Float, nullable=False, default=0.0),  # backoff: not claimable before this
    Column("attempt_id", String(32)),  # the fencing token of the current attempt
    Column("worker_id", String(32)),
    Column("lease_expires_at", Float),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("max_attempts", Integer, nullable=False, default=3),  # the error budget
    Column("attempts", Integer, nullable=False, default=0),
    Column("errors", Integer, nullable=False, default=0),
    Column("losses", Integer, nullable=False, default=0),
    Column("preemptions", Integer, nullable=False, default=0),
    Column("step", Integer),
    Column("progress_done", Float),
    Column("progress_total", Float),
    Column("checkpoint", JSON),  # pointer to the last durable checkpoint: {uri, step, time}
    Column("result", JSON),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    # The id the trainer's users know the config by outside gridfleet (trainer.external_id; seed 001's config
    # id), so their old result files can be joined with ours; NULL when the trainer offers none.
    Column("external_id", String(200)),
    # Jobs of one grid with the same fuse key can be trained as one stacked model (trainer.fuse_key); a gang
    # claim takes up to K of them at once. NULL: never fused, claimed one at a time.
    Column("fuse_key", String(200)),
    # Early stopping (scheduler/pruning.py, migration 0007): the step and the rule that pruned the job (set when
    # the scheduler decides; the job's state becomes `pruned` when its worker stops it), and `prune_exempt`: a
    # user resumed it by hand, so no rule prunes it again.
    Column("pruned_step", Integer),
    Column("pruned_by", Text),
    Column("prune_exempt", Boolean, nullable=False, default=False),
    # Its grid_id prefix also serves a grid's jobs by state: no (grid_id, state) index, since every claim and
    # finish would insert into it (migration 0010).
    UniqueConstraint("grid_id", "key", name="uq_jobs_grid_key"),
    # Postgres: room on each page for a row's next versions. No index holds a column the claim, a heartbeat or
    # a finish writes (state, lease, worker, progress), so all three update the row HOT: no index entry per
    # update, and no dead entries for later claims to read (migration 0016).
    postgresql_with={"fillfactor": 50},
)

# The queue's own narrow tables (migration 0016), kept from the job's state: a job is in `claimable` exactly
# while it is queued and in `running` exactly while it runs. Triggers on `jobs` make every move (a retry, a
# cancel, an expiry scan, a resume), except on Postgres the two of every cycle (a claim, a finish), which the
# Queue's own statements make (scheduler/claim_sql.py, scheduler/queue.py). An index on `jobs` for those states would
# hold `state`, and every claim and finish would then insert index entries and leave dead ones behind.
# claimable: what a claim filters and orders by, a copy of the job's columns. Keyed by rank = -priority, then
# id: the claim's order (priority high first, then age), which a claim starts reading at its claim floor.
claimable = Table(
    "claimable",
    metadata,
    Column("rank", Integer, nullable=False),
    Column("job_id", Integer, nullable=False),
    Column("grid_id", Integer, nullable=False),
    Column("trainer", String(100), nullable=False),
    Column("gpus", Float, nullable=False),
    Column("code_rev", String(100)),
    Column("not_before", Float, nullable=False),
    Column("fuse_key", String(200)),
    PrimaryKeyConstraint("rank", "job_id", name="claimable_pkey"),
    sqlite_with_rowid=False,
)
# A gang claim takes the queued jobs of the first job's grid and fuse key, in claim order. Jobs without a key
# gang only themselves and are never read through it, so it does not hold them (migration 0012).
_HAS_FUSE_KEY = text("fuse_key IS NOT NULL")
Index("ix_claimable_gang", claimable.c.grid_id, claimable.c.fuse_key, claimable.c.rank, claimable.c.job_id,
      postgresql_where=_HAS_FUSE_KEY, sqlite_where=_HAS_FUSE_KEY)
# running: the running jobs by worker, for the expiry scan and "what does this worker run now". No lease in it:
# the lease stays on the job row, which heartbeats update HOT; the scan reads the few running jobs' rows.
running = Table(
    "running",
    metadata,
    Column("worker_id", String(32), nullable=False),
    Column("job_id", Integer, nullable=False),
    PrimaryKeyConstraint("worker_id", "job_id", name="running_pkey"),
    sqlite_with_rowid=False,
)

_HAS_EXTERNAL_ID = text("external_id IS NOT NULL")
Index("ix_jobs_external_id", jobs.c.external_id, postgresql_where=_HAS_EXTERNAL_ID, sqlite_where=_HAS_EXTERNAL_ID)

# A grid's `search:` (scheduler/search.py). The sampler's own state lives in Optuna's tables (same database);
# these rows tie its trials to our jobs and serialize the asking. One row per search grid: a lease on
# asking (holder, until) and `wake`, bumped by anyone who wants the holder to look again.
searches = Table(
    "searches",
    metadata,
    Column("grid_id", Integer, ForeignKey("grids.id", ondelete="CASCADE"), primary_key=True),
    Column("lock_owner", String(32)),
    Column("lock_until", Float, nullable=False, default=0.0),
    Column("wake", Integer, nullable=False, default=0),
    Column("state", String(20), nullable=False, default="running"),  # running | done
    Column("updated_at", Float, nullable=False),
)

# One row per Optuna trial of a point's study (`point`: the key of the axis point it searches around).
# `job_id`: the job that runs its config; `duplicate`: that job belongs to another trial (the config was
# suggested twice: it runs once, both trials are told its result). `told`: the state told to the sampler.
search_trials = Table(
    "search_trials",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("grid_id", Integer, ForeignKey("grids.id", ondelete="CASCADE"), nullable=False),
    Column("point", String(64), nullable=False),
    Column("number", Integer, nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE")),
    Column("duplicate", Boolean, nullable=False, default=False),
    Column("told", String(20)),  # NULL until told: COMPLETE | FAIL | PRUNED
    Column("value", Float),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("grid_id", "point", "number", name="uq_search_trials_number"),
    Index("ix_search_trials_grid_told", "grid_id", "told"),
    Index("ix_search_trials_job", "job_id"),
)

# Keyed by (job_id, id): a job's history is the key's prefix, and on SQLite (WITHOUT ROWID) the rows are that one
# B-tree, so a cycle's attempt writes land on one page. Every write of an attempt names its job. No foreign key:
# jobs are never deleted (migration 0014).
attempts = Table(
    "attempts",
    metadata,
    Column("id", String(32), nullable=False),
    Column("job_id", Integer, nullable=False),
    Column("worker_id", String(32)),
    Column("outcome", String(20), nullable=False, default="running"),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Column("code_rev", String(100)),
    Column("error", Text),
    PrimaryKeyConstraint("job_id", "id", name="attempts_pkey"),
    sqlite_with_rowid=False,
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("host", String(200), nullable=False),
    Column("gpus", JSON, nullable=False),  # list of GPU descriptions the worker sees
    Column("trainers", JSON, nullable=False),  # trainer names it can run
    Column("resources", JSON, nullable=False),
    Column("code_rev", String(100)),
    # As registered (idle, NULL): no claim or finish writes them. GET /workers derives a worker's state (busy,
    # idle) and current job from the jobs it runs (scheduler/reports.list_workers).
    Column("state", String(20), nullable=False, default="idle"),
    Column("current_job_id", Integer),
    Column("registered_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False),
    # sha256 hex of the secret POST /workers/register returned; the secret itself is never stored.
    # NULL for workers registered before migration 0004: they must register again.
    Column("secret_hash", String(64)),
)

# What happened to a worker outside any job: a self-update, a rollback, a refused dirty tree.
worker_events = Table(
    "worker_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("worker_id", String(32), ForeignKey("workers.id", ondelete="CASCADE"), nullable=False),
    Column("time", Float, nullable=False),
    Column("kind", String(40), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_worker_events_worker", "worker_id", "id"),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt_id", String(32), nullable=False),
    Column("step", Integer, nullable=False),
    Column("time", Float, nullable=False),
    Column("values", JSON, nullable=False),
    Index("ix_metrics_job_step", "job_id", "step"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt_id", String(32)),
    Column("time", Float, nullable=False),
    Column("kind", String(40), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_events_job", "job_id", "id"),
)

# ASHA's rungs (scheduler/pruning.py): the value a job had when it first reached each rung, and whether it
# was promoted. Decisions of one grid are serialized; `id` keeps the order they were made in, which is what
# asynchronous successive halving compares against (the values recorded at that rung before).
prune_rungs = Table(
    "prune_rungs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("grid_id", Integer, ForeignKey("grids.id", ondelete="CASCADE"), nullable=False),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("rung", Integer, nullable=False),
    Column("step", Integer, nullable=False),  # the reported step whose value was taken (first >= the rung's)
    Column("value", Float, nullable=False),
    Column("promoted", Boolean, nullable=False),
    Column("time", Float, nullable=False),
    UniqueConstraint("job_id", "rung", name="uq_prune_rungs_job_rung"),
    Index("ix_prune_rungs_grid", "grid_id", "rung"),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("role", String(20), nullable=False),  # admin | submit | worker
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 hex; the token is never stored
    Column("created_at", Float, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)
