"""Where a Postgres cycle's CPU goes: the finish_and_claim cycle on variants of the schema, and the bare loop,
taking turns in one process (issue 15).

Each variant gets a database of its own, migrated as the product's, then changed by the variant's SQL (an
index or a constraint dropped: what a redesign would save, measured before anyone builds it). One process
runs every loop in short turns, alternating their order, so the machine's drifting speed falls on all of them
alike (on this VM the same block swung by 40% between separate runs). It prints CPU us per job, this process
and the backend apart, and each loop against the schema as it ships.

    .venv/bin/python bench/queue_parts.py --jobs 10000

A round-trip probe first: the client CPU of `SELECT 1` and of a statement that keeps the server busy for
about 0.4 ms. Where the second costs the client much more, the client's CPU per cycle grows with the server's
time (waking from the wait costs), so the client side cannot be judged apart from the server's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processes import PG_ADMIN_URL_DEFAULT, Cleanup, create_pg_database  # noqa: E402
from bench.queue_sustained import BARE_CLAIM, BARE_FINISH, BARE_PG, _bare_connection, _cpu_now  # noqa: E402

# name -> SQL run on its database after the migrations. "as shipped" is the reference.
VARIANTS = {
    "as shipped": [],
    # Migration 0014's attempts undone: keyed by id, with a job_id index and the foreign key to jobs (a
    # lookup and a FOR KEY SHARE lock of the row the same statement just updated) beside it.
    "attempts before 0014": ["ALTER TABLE attempts DROP CONSTRAINT attempts_pkey",
                             "ALTER TABLE attempts ADD CONSTRAINT attempts_pkey PRIMARY KEY (id)",
                             "ALTER TABLE attempts ADD CONSTRAINT attempts_job_id_fkey FOREIGN KEY (job_id) "
                             "REFERENCES jobs (id) ON DELETE CASCADE",
                             "CREATE INDEX ix_attempts_job ON attempts (job_id)"],
    # The one index of jobs left beside its key (migration 0016): the cycle's updates are HOT, so it should
    # cost nothing per cycle.
    "no uq key": ["ALTER TABLE jobs DROP CONSTRAINT uq_jobs_grid_key"],
}
TURN = 500  # cycles per loop per turn
WARMUP = 500  # cycles per loop before measuring: statements prepared, caches warm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="cycles per loop (10,000)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("GRIDFLEET_BENCH_POSTGRES_URL", PG_ADMIN_URL_DEFAULT))
    args = parser.parse_args(argv)
    cleanup = Cleanup(admin_url=args.pg_admin_url)
    try:
        loops = {name: _gridfleet_loop(cleanup, args.jobs, sql) for name, sql in VARIANTS.items()}
        loops["bare loop"] = _bare_loop(cleanup, args.jobs)
        _probe(loops["bare loop"].conn)
        totals = _run(loops, args.jobs)
        for loop in loops.values():
            loop.close()
    finally:
        cleanup.run()
    _report(totals, (args.jobs // TURN) * TURN)
    return 0


class _Loop:
    """One claim+finish loop and the backend pids whose CPU is its own."""

    def __init__(self, cycle, pids, close, conn=None):
        self.cycle, self.pids, self.close, self.conn = cycle, pids, close, conn


def _gridfleet_loop(cleanup: Cleanup, jobs: int, variant_sql: list[str]) -> _Loop:
    from sqlalchemy import text

    from common.db import make_engine
    from scheduler.grids import submit_grid
    from scheduler.queue import Queue
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    engine = make_engine(create_pg_database(cleanup, "parts"))
    submit_grid(engine, GridSpec.model_validate({"name": "parts", "trainer": "noop",
                                                 "axes": {"value": [float(i) for i in range(jobs + WARMUP + 10)]}}),
                validate_config)
    with engine.begin() as conn:
        for statement in variant_sql:
            conn.execute(text(statement))
    queue = Queue(engine)
    worker_id = queue.register_worker(name="bench", host="bench", trainers=["noop"])
    held = [queue.claim(worker_id, trainers=["noop"])]

    def cycle() -> None:
        job = held[0]
        reply, held[0] = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 0.0},
                                                worker_id=worker_id, trainers=["noop"])
        if not reply.ok or held[0] is None:
            raise RuntimeError("a finish was refused or nothing was left to claim")

    for _ in range(WARMUP):
        cycle()

    def close() -> None:
        queue.close()
        engine.dispose()

    return _Loop(cycle, lambda: [c.info.backend_pid for c in queue._autocommit._open], close)


def _bare_loop(cleanup: Cleanup, jobs: int) -> _Loop:
    conn = _bare_connection(create_pg_database(cleanup, "parts_bare"))
    for statement in BARE_PG["setup"]:
        conn.execute(statement.format(n=jobs + WARMUP + 10))
    claim, finish = BARE_CLAIM.format(pick=BARE_PG["pick"]), BARE_FINISH.format(param="%s")

    def cycle() -> None:
        conn.execute(finish, (conn.execute(claim).fetchone()[0],))

    for _ in range(WARMUP):
        cycle()
    return _Loop(cycle, lambda: [conn.info.backend_pid], conn.close, conn)


def _probe(conn) -> None:
    for statement in ("SELECT 1", "SELECT count(*) FROM generate_series(1, 4000)"):
        for _ in range(50):
            conn.execute(statement).fetchone()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(2000):
            conn.execute(statement).fetchone()
        print(f"round trip `{statement}`: client CPU {(time.process_time() - cpu) / 2000 * 1e6:.0f} us, "
              f"wall {(time.perf_counter() - wall) / 2000 * 1e6:.0f} us")


def _run(loops: dict[str, _Loop], jobs: int) -> dict[str, list[float]]:
    """Turns of TURN cycles, every loop once per round, the order reversed every other round."""
    totals = {name: [0.0, 0.0] for name in loops}
    names = list(loops)
    for round_number in range(jobs // TURN):
        for name in names if round_number % 2 == 0 else reversed(names):
            loop = loops[name]
            pids = loop.pids()
            client, backend = _cpu_now(pids)
            for _ in range(TURN):
                loop.cycle()
            client_after, backend_after = _cpu_now(pids)
            totals[name][0] += client_after - client
            totals[name][1] += backend_after - backend
    return totals


def _report(totals: dict[str, list[float]], cycles: int) -> None:
    reference = sum(totals["as shipped"])
    print(f"\n{cycles:,} cycles per loop, in turns of {TURN}; CPU us per job (this process + its backend)")
    print(f"{'loop':<30} {'client':>7} {'backend':>8} {'total':>7}  vs as shipped")
    for name, (client, backend) in totals.items():
        print(f"{name:<30} {client / cycles * 1e6:>7.0f} {backend / cycles * 1e6:>8.0f} "
              f"{(client + backend) / cycles * 1e6:>7.0f}  {(client + backend) / reference:.3f}x")
    print(f"bare / as shipped by CPU: {sum(totals['bare loop']) / reference:.2f}x (issue 15's target: >= 0.8x)")


if __name__ == "__main__":
    raise SystemExit(main())
