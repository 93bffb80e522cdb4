"""Queued and running jobs in narrow tables of their own, kept by triggers: job-row updates stay HOT

ix_jobs_claim, ix_jobs_gang and ix_jobs_running were partial indexes on `jobs.state`, so every claim and every
finish changed an indexed column: Postgres wrote a new index entry into each index whose predicate the new row
meets, and the entries they replaced stayed behind, dead, until a VACUUM (issue 15: 12 of a 16-worker cycle's
backend microseconds were index inserts). They become two tables: `claimable` (a queued job's rank, id and
the columns a claim filters on) and `running` (a running job's worker and id), and `jobs` keeps no index on a
column the claim, heartbeat or finish writes, so all three update the row HOT (fillfactor 50: room on each
page for the next versions). A prototype of this cycle did 1.08x a bare SKIP LOCKED loop at 16 workers where
the partial indexes did 0.78x (bench/README.md).

Triggers on `jobs` keep both tables from the job's state, so whatever moves a job (a finish, a retry, an
expiry scan, a cancel, a resume, a pruning) keeps them right without knowing they exist; on Postgres the
Queue's claims and successful finishes move their jobs themselves, in the same statement (_PG_STATE_MOVED).
A claim locks the claimable row and the job row with SKIP LOCKED, so it never waits for a cancel or a retry,
which lock the job row and then, in their trigger, the claimable row: the two never deadlock.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_CLAIMABLE_COLUMNS = "rank, job_id, grid_id, trainer, gpus, code_rev, not_before, fuse_key"
_CLAIMABLE_OF = "-{0}.priority, {0}.id, {0}.grid_id, {0}.trainer, {0}.gpus, {0}.code_rev, {0}.not_before, {0}.fuse_key"
_COPIED_COLUMNS = "priority, not_before, grid_id, trainer, gpus, code_rev, fuse_key"
# Two update triggers, each fired only by an UPDATE that sets one of its columns. Postgres parses and prepares
# a trigger's WHEN for every UPDATE statement that sets one, so the one a claim and a finish set (`state`) is
# kept small: 5 comparisons (a WHEN of 9 IS DISTINCT FROM tests was 10% of a cycle's backend CPU).
# - A change of state. On Postgres the Queue's own statements move their jobs for the two moves of every
#   cycle, and the trigger leaves those to them: a plpgsql call cost 28 us of a 120 us claim. A claim (one
#   job, a gang, a regain: the only ways into `running`) moves the job from `claimable` to `running`; a
#   finish that succeeds takes it out of `running` (every finish does; for the others the trigger then finds
#   nothing to delete and queues the job again where it should). SQLite compiles a trigger into the statement
#   that fires it, where it costs what the same statements written out would: there it makes every move.
# - A queued job's copied columns (a grid's new priority, a backoff): its claimable row follows.
_PG_STATE_MOVED = ("OLD.state <> NEW.state AND NEW.state <> 'running' "
                   "AND (OLD.state <> 'running' OR NEW.state <> 'succeeded')")
_STILL_QUEUED = "OLD.state = 'queued' AND NEW.state = 'queued'"

_PG_FUNCTION = f"""
CREATE FUNCTION jobs_queue_tables() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        IF OLD.state = 'queued' THEN
            DELETE FROM claimable WHERE rank = -OLD.priority AND job_id = OLD.id;
        ELSIF OLD.state = 'running' THEN
            DELETE FROM running WHERE worker_id = OLD.worker_id AND job_id = OLD.id;
        END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        IF NEW.state = 'queued' THEN
            INSERT INTO claimable ({_CLAIMABLE_COLUMNS}) VALUES ({_CLAIMABLE_OF.format("NEW")});
        ELSIF NEW.state = 'running' THEN
            INSERT INTO running (worker_id, job_id) VALUES (NEW.worker_id, NEW.id);
        END IF;
    END IF;
    RETURN NULL;
END $$
"""
_PG_TRIGGERS = [
    "CREATE TRIGGER jobs_queue_insert AFTER INSERT ON jobs FOR EACH ROW "
    "WHEN (NEW.state IN ('queued', 'running')) EXECUTE FUNCTION jobs_queue_tables()",
    f"CREATE TRIGGER jobs_queue_state AFTER UPDATE OF state ON jobs FOR EACH ROW "
    f"WHEN ({_PG_STATE_MOVED}) EXECUTE FUNCTION jobs_queue_tables()",
    f"CREATE TRIGGER jobs_queue_copy AFTER UPDATE OF {_COPIED_COLUMNS} ON jobs FOR EACH ROW "
    f"WHEN ({_STILL_QUEUED}) EXECUTE FUNCTION jobs_queue_tables()",
    "CREATE TRIGGER jobs_queue_delete AFTER DELETE ON jobs FOR EACH ROW "
    "WHEN (OLD.state IN ('queued', 'running')) EXECUTE FUNCTION jobs_queue_tables()",
]
# SQLite: a trigger's statements are compiled into the statement that fires it; each is filtered by the state
# it is for instead of an IF.
_SQLITE_REMOVE = """
    DELETE FROM claimable WHERE OLD.state = 'queued' AND rank = -OLD.priority AND job_id = OLD.id;
    DELETE FROM running WHERE OLD.state = 'running' AND worker_id = OLD.worker_id AND job_id = OLD.id;"""
_SQLITE_ADD = f"""
    INSERT INTO claimable ({_CLAIMABLE_COLUMNS}) SELECT {_CLAIMABLE_OF.format("NEW")} WHERE NEW.state = 'queued';
    INSERT INTO running (worker_id, job_id) SELECT NEW.worker_id, NEW.id WHERE NEW.state = 'running';"""
_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER jobs_queue_insert AFTER INSERT ON jobs WHEN NEW.state IN ('queued', 'running') "
    f"BEGIN {_SQLITE_ADD}\nEND",
    f"CREATE TRIGGER jobs_queue_state AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state "
    f"BEGIN {_SQLITE_REMOVE}{_SQLITE_ADD}\nEND",
    f"CREATE TRIGGER jobs_queue_copy AFTER UPDATE OF {_COPIED_COLUMNS} ON jobs WHEN {_STILL_QUEUED} "
    f"BEGIN {_SQLITE_REMOVE}{_SQLITE_ADD}\nEND",
    f"CREATE TRIGGER jobs_queue_delete AFTER DELETE ON jobs WHEN OLD.state IN ('queued', 'running') "
    f"BEGIN {_SQLITE_REMOVE}\nEND",
]
_TRIGGER_NAMES = ("jobs_queue_insert", "jobs_queue_state", "jobs_queue_copy", "jobs_queue_delete")

RANK = sa.text("(-priority)")
QUEUED = sa.text("state = 'queued'")
QUEUED_WITH_KEY = sa.text("state = 'queued' AND fuse_key IS NOT NULL")
RUNNING = sa.text("state = 'running'")
HAS_FUSE_KEY = sa.text("fuse_key IS NOT NULL")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "claimable",
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("grid_id", sa.Integer, nullable=False),
        sa.Column("trainer", sa.String(100), nullable=False),
        sa.Column("gpus", sa.Float, nullable=False),
        sa.Column("code_rev", sa.String(100)),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("fuse_key", sa.String(200)),
        sa.PrimaryKeyConstraint("rank", "job_id", name="claimable_pkey"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_claimable_gang", "claimable", ["grid_id", "fuse_key", "rank", "job_id"],
                    postgresql_where=HAS_FUSE_KEY, sqlite_where=HAS_FUSE_KEY)
    op.create_table(
        "running",
        sa.Column("worker_id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("worker_id", "job_id", name="running_pkey"),
        sqlite_with_rowid=False,
    )
    op.execute(f"INSERT INTO claimable ({_CLAIMABLE_COLUMNS}) SELECT {_CLAIMABLE_OF.format('jobs')} FROM jobs "
               "WHERE state = 'queued'")
    op.execute("INSERT INTO running (worker_id, job_id) SELECT worker_id, id FROM jobs "
               "WHERE state = 'running' AND worker_id IS NOT NULL")
    if sqlite:
        for trigger in _SQLITE_TRIGGERS:
            op.execute(trigger)
    else:
        op.execute(_PG_FUNCTION)
        for trigger in _PG_TRIGGERS:
            op.execute(trigger)
        op.execute("ALTER TABLE jobs SET (fillfactor = 50)")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_index("ix_jobs_gang", table_name="jobs")
    op.drop_index("ix_jobs_running", table_name="jobs")


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_index("ix_jobs_claim", "jobs", [RANK, "id"], postgresql_where=QUEUED, sqlite_where=QUEUED)
    op.create_index("ix_jobs_gang", "jobs", ["grid_id", "fuse_key", RANK, "id"], postgresql_where=QUEUED_WITH_KEY,
                    sqlite_where=QUEUED_WITH_KEY)
    op.create_index("ix_jobs_running", "jobs", ["worker_id", "id"], postgresql_where=RUNNING, sqlite_where=RUNNING,
                    postgresql_with={"deduplicate_items": "off"})
    for name in _TRIGGER_NAMES:
        op.execute(f"DROP TRIGGER {name}" if sqlite else f"DROP TRIGGER {name} ON jobs")
    if not sqlite:
        op.execute("DROP FUNCTION jobs_queue_tables()")
        op.execute("ALTER TABLE jobs SET (fillfactor = 70)")
    op.drop_table("running")
    op.drop_index("ix_claimable_gang", table_name="claimable")
    op.drop_table("claimable")
