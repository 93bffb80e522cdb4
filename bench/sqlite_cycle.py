"""SQLite: what one claim+finish cycle costs, four ways side by side in one process (issue 15).

    .venv/bin/python bench/sqlite_cycle.py                      # 12,000 cycles each, blocks of 500
    .venv/bin/python bench/sqlite_cycle.py --other-grids 500     # beside 500 finished grids

Read `main`: the loops take turns in blocks of --block cycles on one database (and one process), so load from
other work on the machine falls on all of them alike; each prints its CPU us per cycle.
    bare      queue_sustained.py's bare loop: `UPDATE ... RETURNING id` claim, then the finish UPDATE, each
              its own transaction, on a three-column table with a partial index (raw sqlite3)
    two tx    Queue.claim, then Queue.finish(succeeded): two BEGIN IMMEDIATE transactions
    one tx    Queue.finish_and_claim(succeeded): one transaction, the embedded agent's cycle
    raw 1 tx  the statements finish_and_claim runs, from a plain sqlite3 loop: the cycle's SQLite cost alone
`one tx - raw 1 tx` is what the Queue's Python adds; `raw 1 tx / bare` is what the schema's writes cost (the
job row's indexes, the attempt: bench/README.md).
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.processes import Cleanup, create_sqlite_database, load1  # noqa: E402
from bench.queue_sustained import BARE_CLAIM, BARE_FINISH, BARE_SQLITE  # noqa: E402

LOOPS = ("bare", "two tx", "one tx", "raw 1 tx")


class Loops:
    """One cycle of each loop, on one database; every loop claims the next queued job."""

    def __init__(self, url: str):
        from common.db import _sqlite_settings, make_engine
        from scheduler.queue import Queue

        self.queue = Queue(make_engine(url))
        self.worker_id = self.queue.register_worker(name="bench", host="bench", trainers=["noop"])
        self.conn = sqlite3.connect(self.queue.engine.url.database, isolation_level=None)
        _sqlite_settings(self.conn)
        self.conn.row_factory = sqlite3.Row
        self.bare_claim, self.bare_finish = BARE_CLAIM.format(pick=BARE_SQLITE["pick"]), BARE_FINISH.format(param="?")
        self.job = self.queue.claim(self.worker_id, trainers=["noop"])  # held between cycles, as an agent's
        self.raw_finish, _ = self.queue.job_write(self.queue._next_state(None, "succeeded", {}, None, 0.0), fenced=True)

    def cycle(self, loop: str) -> None:
        queue, job, wid = self.queue, self.job, self.worker_id
        if loop == "bare":
            row = self.conn.execute(self.bare_claim).fetchone()
            self.conn.execute(self.bare_finish, (row[0],))
        elif loop == "two tx":
            if not queue.finish(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=wid).ok:
                raise RuntimeError("finish refused")
            self.job = queue.claim(wid, trainers=["noop"])
        elif loop == "one tx":
            reply, self.job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 0.0},
                                                     worker_id=wid, trainers=["noop"])
            if not reply.ok:
                raise RuntimeError("finish refused")
        else:
            self.job = self._raw_cycle(job.id, job.attempt_id)

    def _raw_cycle(self, job_id: int, attempt_id: str):
        """finish_and_claim's statements (scheduler/queue.py), without the Queue's Python around them."""
        from scheduler import queue as q
        from scheduler.claim_sql import ClaimFilters, sqlite_claim

        conn, wid, now = self.conn, self.worker_id, time.time()
        conn.execute("BEGIN IMMEDIATE")
        finished = conn.execute(self.raw_finish, {
            "v_state": "succeeded", "v_result": '{"loss": 0.0}', "v_finished_at": now, "v_attempt_id": None,
            "v_worker_id": None, "v_lease_expires_at": None,
            "b_job_id": job_id, "b_attempt_id": attempt_id, "b_worker_id": wid}).rowcount
        if not finished:
            raise RuntimeError("finish refused")
        conn.execute(q.END_ATTEMPT, {"job_id": job_id, "aid": attempt_id, "outcome": "succeeded", "now": now,
                                     "error": None})
        # no events row: a succeeded attempt's row is its end event (q.ENDS_IN_ATTEMPT_ROW)
        aid = q.new_id()
        filters = ClaimFilters.of(["noop"], 0.0, False, None)  # as Queue.claim(wid, trainers=["noop"])
        floor = self.queue.claim_floor(filters, False)
        row = conn.execute(sqlite_claim(filters), {
            "aid": aid, "wid": wid, "lease": now + 60.0, "now": now, "from_rank": floor[0], "from_id": floor[1]}).fetchone()
        conn.execute(q.NEW_ATTEMPT, {"aid": aid, "job_id": row["id"], "wid": wid, "now": now, "code_rev": None})
        # no WORKER_SEEN: the Queue skips it while the last_seen_at it wrote is under 5 s old
        conn.execute("COMMIT")
        return SimpleJob(row["id"], aid)


class SimpleJob:
    def __init__(self, id: int, attempt_id: str):  # noqa: A002 - ClaimedJob's field names
        self.id, self.attempt_id = id, attempt_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=12_000, help="cycles per loop (12,000)")
    parser.add_argument("--block", type=int, default=500, help="cycles per turn (500)")
    parser.add_argument("--other-grids", type=int, default=0,
                        help="grids with no queued job beside the one claimed from (finished grids stay; 0)")
    args = parser.parse_args(argv)
    from common.db import make_engine
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    cleanup = Cleanup(admin_url="")  # SQLite only: no Postgres database to drop
    try:
        url = create_sqlite_database(cleanup)
        engine = make_engine(url)
        jobs = 3 * args.cycles + 1_000  # three loops take jobs; the spare ones stay queued
        submit_grid(engine, GridSpec.model_validate({"name": "cycle", "trainer": "noop",
                                                     "axes": {"value": [float(i) for i in range(jobs)]}}),
                    validate_config)
        with engine.begin() as conn:
            conn.exec_driver_sql(BARE_SQLITE["setup"][0])
            conn.exec_driver_sql(BARE_SQLITE["setup"][1])
            conn.exec_driver_sql(BARE_SQLITE["setup"][2].format(n=args.cycles + 1_000))
            now = time.time()
            for i in range(args.other_grids):  # a finished grid stays 'active' with no queued job
                conn.exec_driver_sql("INSERT INTO grids (name, trainer, spec, priority, max_attempts, state, created_at, "
                                     "updated_at) VALUES (?, 'noop', '{}', 0, 3, 'active', ?, ?)", (f"done-{i}", now, now))
        engine.dispose()
        loops = Loops(url)
        cpu = dict.fromkeys(LOOPS, 0.0)
        print(f"SQLite claim+finish, {args.cycles:,} cycles per loop in turns of {args.block}"
              f", {args.other_grids} other grids; "
              f"load average {load1()}")
        for _ in range(args.cycles // args.block):
            for loop in LOOPS:
                started = time.process_time()
                for _ in range(args.block):
                    loops.cycle(loop)
                cpu[loop] += time.process_time() - started
        done = args.cycles // args.block * args.block
        for loop in LOOPS:
            us = cpu[loop] / done * 1e6
            print(f"{loop:<9} {us:6.0f} us CPU per cycle   bare / this {cpu['bare'] / cpu[loop]:.2f}x")
        print(f"load average after: {load1()}")
        loops.queue.close()
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
