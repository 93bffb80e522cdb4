"""Sustained queue throughput: 100,000 jobs claimed and finished in one go, no VACUUM by us in between, as
jobs/s per 10,000-job block, beside a bare reference loop on the same database, in one run.

    .venv/bin/python bench/queue_throughput.py --sustained                  # both databases, 100,000 jobs
    .venv/bin/python bench/queue_sustained.py --backends postgres --jobs 30000 --workers 4

Read `main` (per database: the bare loop, then gridfleet), `_gridfleet` and `_bare` (one worker process each).
    gridfleet  noop jobs, one job per cycle: Queue.finish_and_claim(succeeded), the finish and the next
               claim in one transaction (SQLite) or one statement (Postgres), as the embedded agent does;
               with --two-calls, Queue.finish then Queue.claim (an HTTP worker's cycle)
    bare       Postgres: `UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id`
               on a partial index of queued rows, then `UPDATE ... SET state = 'succeeded'`, autocommit,
               prepared (what a minimal queue does); SQLite: the same two statements without the lock,
               each its own transaction, on a raw sqlite3 connection
A block's rate is 10,000 / the time between its first and last finish (all workers' finishes merged); its
CPU per job is what the loop's processes and (Postgres, local server) their backends spent on it, from
/proc: the steadier number when other work shares the cores. The header says whether the server's
autovacuum is on (on the development VM it is off: nothing vacuums).
Postgres: EXPLAIN (ANALYZE, BUFFERS) of the claim's pick after 0, 20,000 and all jobs finished, from the
Queue's claim floor (every claim between expiry scans) and from the start (the first claim after each
scan, at most once a second). Targets (issue 15): last block >= 0.9x the first; gridfleet's first block
>= 0.8x bare on Postgres, >= 0.3x on SQLite. Everything shares this machine's cores: compare within a run.
"""
from __future__ import annotations

import argparse
import os
import queue as queue_module
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.processes import (  # noqa: E402
    MAX_JOBS_PER_GRID, PG_ADMIN_URL_DEFAULT, SPAWN, Cleanup, create_pg_database, create_sqlite_database, load1, pg_setting,
)

SPARE_JOBS = 1_000  # left queued at the end, so the last EXPLAIN finds a job as every claim before it did
TARGETS = {"postgres": 0.8, "sqlite": 0.3}  # gridfleet first block / bare first block
TARGET_FLAT = 0.9  # last block / first block
BARE_PG = {
    "setup": ["CREATE TABLE bare_jobs (id serial PRIMARY KEY, priority integer NOT NULL DEFAULT 0, state text NOT NULL)",
              "CREATE INDEX bare_claim ON bare_jobs (priority DESC, id) WHERE state = 'queued'",
              "INSERT INTO bare_jobs (state) SELECT 'queued' FROM generate_series(1, {n})", "ANALYZE bare_jobs"],
    "pick": "SELECT id FROM bare_jobs WHERE state = 'queued' ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED",
}
BARE_CLAIM = "UPDATE bare_jobs SET state = 'running' WHERE id = ({pick}) RETURNING id"
BARE_FINISH = "UPDATE bare_jobs SET state = 'succeeded' WHERE id = {param}"
BARE_SQLITE = {
    "setup": ["CREATE TABLE bare_jobs (id INTEGER PRIMARY KEY, priority integer NOT NULL DEFAULT 0, state text NOT NULL)",
              "CREATE INDEX bare_claim ON bare_jobs (priority DESC, id) WHERE state = 'queued'",
              "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) "
              "INSERT INTO bare_jobs (state) SELECT 'queued' FROM n"],
    "pick": "SELECT id FROM bare_jobs WHERE state = 'queued' ORDER BY priority DESC, id LIMIT 1",
}


# ---- worker processes -------------------------------------------------------------------------------------
def _gridfleet(url: str, jobs: int, block: int, explain_at: list[int], two_calls: bool, go, results) -> None:
    """Claim and finish `jobs` jobs; the finish times, CPU seconds (this process and its Postgres backends)
    after every `block` jobs, and EXPLAIN buffers at `explain_at` (Postgres)."""
    from common.db import is_sqlite, make_engine
    from scheduler.queue import Queue

    engine = make_engine(url)
    queue = Queue(engine)
    worker_id = queue.register_worker(name="bench", host="bench", trainers=["noop"])
    explains, done, cpu = {}, [], []
    job = None
    results.put("ready")
    go.wait()
    while len(done) < jobs:
        if len(done) % block == 0:
            cpu.append(_cpu_now([c.info.backend_pid for c in queue._autocommit._open] if queue._autocommit else []))
        if len(done) in explain_at and not is_sqlite(url):
            explains[len(done)] = _claim_buffers(queue, job)
        if job is None:  # the first claim (finish_and_claim claims each next one), or --two-calls
            job = queue.claim(worker_id, trainers=["noop"])
            if job is None:
                break
        if two_calls:  # the next loop's claim takes the next job
            reply, job = queue.finish(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=worker_id), None
        else:
            reply, job = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 0.0},
                                                worker_id=worker_id, trainers=["noop"])
        if not reply.ok:
            raise RuntimeError("finish refused")
        done.append(time.time())
    cpu.append(_cpu_now([c.info.backend_pid for c in queue._autocommit._open] if queue._autocommit else []))
    if len(done) in explain_at and not is_sqlite(url):
        explains[len(done)] = _claim_buffers(queue, job)
    results.put({"times": done, "explains": explains, "cpu": cpu})
    queue.close()
    engine.dispose()


def _claim_buffers(queue, job) -> dict[str, int]:
    """Buffers the claim's pick reads (EXPLAIN ANALYZE in a rolled-back transaction): from this Queue's claim
    floor, and from the start; the expiry scan's; and the fence of a finish or heartbeat of `job` (its
    WHERE as a prepared SELECT: the generic plan the Queue's connections use), when a job is held."""
    from scheduler.claim_sql import CLAIM_FLOOR, ClaimFilters, pick, pyformat, sql_string

    filters = ClaimFilters.of(["noop"], 0.0, False, None)  # as Queue.claim(wid, trainers=["noop"])
    statement = pyformat(pick(filters, True))
    floor = queue._claim_floors.get(filters, CLAIM_FLOOR)
    out = {}
    for name, (rank, job_id) in (("floor", floor), ("start", CLAIM_FLOOR)):
        params = {"now": time.time(), "from_rank": rank, "from_id": job_id}
        out[name] = _explain_buffers(queue._autocommit, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params)
    out["expiry"] = _explain_buffers(queue._autocommit, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
                                     + queue._sql(queue._expired_sql), {"now": time.time(), "expired_since": 0.0})
    if job is not None:
        with queue._autocommit.connection() as conn:
            conn.execute("PREPARE fence (int, text, text) AS SELECT id FROM jobs WHERE id = $1 AND attempt_id = $2 "
                         "AND worker_id = $3 AND state = 'running'")
            try:
                row = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE fence ({job.id:d}, "  # no binds
                                   f"{sql_string(job.attempt_id)}, {sql_string(job.worker_id)})").fetchone()
            finally:
                conn.execute("DEALLOCATE fence")
        plan = next(iter(row.values()))[0]["Plan"]
        out["fence"] = plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]
    return out


def _explain_buffers(connections, statement: str, params) -> int:
    with connections.connection() as conn:
        with conn.transaction(force_rollback=True):
            row = conn.execute(statement, params).fetchone()
    plan = next(iter(row.values()))[0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


def _cpu_now(backend_pids: list[int]) -> tuple[float, float]:
    """CPU seconds of this process and of the given Postgres backends (Linux /proc; the server is local)."""
    from bench.processes import proc_cpu

    return time.process_time(), sum(proc_cpu(pid) or 0.0 for pid in backend_pids)


def _bare(url: str, jobs: int, block: int, go, results) -> None:
    """The bare loop: claim and finish `jobs` rows of bare_jobs."""
    from common.db import is_sqlite

    sqlite = is_sqlite(url)
    conn = _bare_connection(url)
    claim = BARE_CLAIM.format(pick=(BARE_SQLITE if sqlite else BARE_PG)["pick"])
    finish = BARE_FINISH.format(param="?" if sqlite else "%s")
    done, cpu = [], []
    pids = [] if sqlite else [conn.info.backend_pid]
    results.put("ready")
    go.wait()
    while len(done) < jobs:
        if len(done) % block == 0:
            cpu.append(_cpu_now(pids))
        row = conn.execute(claim).fetchone()
        if row is None:
            break
        conn.execute(finish, (row[0],))
        done.append(time.time())
    cpu.append(_cpu_now(pids))
    results.put({"times": done, "explains": {}, "cpu": cpu})
    conn.close()


def _bare_connection(url: str):
    from sqlalchemy.engine import make_url

    from common.db import is_sqlite, normalize_url

    if is_sqlite(url):
        import sqlite3

        conn = sqlite3.connect(make_url(url).database, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn
    import psycopg

    return psycopg.connect(make_url(normalize_url(url)).set(drivername="postgresql").render_as_string(False),
                           autocommit=True, prepare_threshold=0)


# ---- one loop, N processes ------------------------------------------------------------------------------
def run_loop(target, per_worker: list[tuple]) -> tuple[float, list[float], dict, list[float]]:
    """One `target` process per argument tuple, released together; returns the start time, all finish times
    (sorted), the EXPLAIN buffers the processes took, and the CPU seconds of each block (all processes)."""
    go, results = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*args, go, results), daemon=True) for args in per_worker]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            if _result(results, procs, 180) != "ready":
                raise RuntimeError("a worker failed to start")
        started = time.time()
        go.set()
        outs = [_result(results, procs, 3600) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30 if go.is_set() else 0)
            if p.is_alive():
                p.terminate()
    explains = {}
    for out in outs:
        explains.update(out["explains"])
    steps = min(len(out["cpu"]) for out in outs) - 1
    cpu = [[sum(out["cpu"][i + 1][part] - out["cpu"][i][part] for out in outs) for part in (0, 1)]
           for i in range(steps)]
    return started, sorted(t for out in outs for t in out["times"]), explains, cpu


def _result(results, procs, timeout: float):
    """The next worker's message; a worker that died first (its traceback is above) ends the run at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker process {dead[0].name} exited with code {dead[0].exitcode}") from None
    raise RuntimeError(f"no worker reported within {timeout:.0f} s")


def shares(jobs: int, workers: int) -> list[int]:
    return [jobs // workers + (1 if i < jobs % workers else 0) for i in range(workers)]


def blocks(started: float, times: list[float], size: int) -> list[float]:
    """jobs/s of each full block of `size` finishes (the first block counts from the start)."""
    rates, begin = [], started
    for end in range(size, len(times) + 1, size):
        rates.append(size / max(1e-9, times[end - 1] - begin))
        begin = times[end - 1]
    return rates


# ---- main ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated subset of sqlite,postgres")
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs claimed and finished by gridfleet (100,000)")
    parser.add_argument("--bare-jobs", type=int, default=20_000, help="rows claimed by the bare loop (20,000)")
    parser.add_argument("--block", type=int, default=10_000, help="jobs per block (10,000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per loop (1)")
    parser.add_argument("--two-calls", action="store_true",
                        help="gridfleet cycles through Queue.finish then Queue.claim (an HTTP worker's way)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("GRIDFLEET_BENCH_POSTGRES_URL", PG_ADMIN_URL_DEFAULT))
    args = parser.parse_args(argv)
    explain_at = sorted({0, min(20_000, args.jobs), args.jobs})
    cleanup = Cleanup(admin_url=args.pg_admin_url)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up (databases, processes) on SIGTERM as on Ctrl-C
    print(f"sustained claim+finish of noop jobs, {args.workers} worker process(es) per loop, no VACUUM by us; "
          f"load average now {load1()}; {os.cpu_count()} cores shared by everything")
    try:
        if "postgres" in args.backends:
            print(f"Postgres autovacuum: {pg_setting(args.pg_admin_url, 'autovacuum')}")
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            url = create_pg_database(cleanup, "sustained") if backend == "postgres" else create_sqlite_database(cleanup)
            _measure(backend, url, args, explain_at)
    finally:
        cleanup.run()
    return 0


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _measure(backend: str, url: str, args, explain_at: list[int]) -> None:
    from common.db import make_engine
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    bare = BARE_SQLITE if backend == "sqlite" else BARE_PG
    conn = _bare_connection(url)
    for statement in bare["setup"]:
        conn.execute(statement.format(n=args.bare_jobs + SPARE_JOBS))
    before = None if backend == "sqlite" else _bare_buffers(conn, bare["pick"])
    engine = make_engine(url)
    left = args.jobs + SPARE_JOBS
    while left > 0:
        count = min(left, MAX_JOBS_PER_GRID)
        submit_grid(engine, GridSpec.model_validate({"name": f"sustained-{left}", "trainer": "noop",
                                                     "axes": {"value": [float(i) for i in range(count)]}}),
                    validate_config)
        left -= count
    engine.dispose()
    print(f"\n{backend}: {args.jobs:,} gridfleet jobs, {args.bare_jobs:,} bare rows; load average {load1()}")
    per_block = args.block // args.workers  # each process samples its CPU after its share of a block
    wal = [_wal_bytes(conn, backend)]
    started, times, _, bare_split = run_loop(_bare, [(url, n, per_block) for n in shares(args.bare_jobs, args.workers)])
    wal.append(_wal_bytes(conn, backend))
    bare_rates = blocks(started, times, args.block)
    after = None if backend == "sqlite" else _bare_buffers(conn, bare["pick"])
    # Worker 0 takes the EXPLAINs after its own share of the points (exact with one worker).
    own_points = [point // args.workers for point in explain_at]
    wal.append(_wal_bytes(conn, backend))
    started, times, own, split = run_loop(_gridfleet, [(url, n, per_block, own_points if i == 0 else [], args.two_calls)
                                                      for i, n in enumerate(shares(args.jobs, args.workers))])
    wal.append(_wal_bytes(conn, backend))
    conn.close()
    explains = {point * args.workers: value for point, value in own.items()}
    rates = blocks(started, times, args.block)
    print(f"{'loop':<10} {'jobs':>8}  jobs/s per {args.block:,}-job block")
    print(f"{'bare':<10} {args.bare_jobs:>8,}  " + " ".join(f"{r:.0f}" for r in bare_rates))
    print(f"{'gridfleet':<10} {len(times):>8,}  " + " ".join(f"{r:.0f}" for r in rates))
    what = "the worker process" + ("" if backend == "sqlite" else " + its Postgres backends")
    print(f"CPU us per job, per block ({what}; steadier than jobs/s when other work shares the cores):")
    bare_cpu, cpu = [sum(block) for block in bare_split], [sum(block) for block in split]
    print(f"{'bare':<10} {'':>8}  " + " ".join(f"{c / per_block / args.workers * 1e6:.0f}" for c in bare_cpu))
    print(f"{'gridfleet':<10} {'':>8}  " + " ".join(f"{c / per_block / args.workers * 1e6:.0f}" for c in cpu))
    if cpu and bare_cpu:
        flat, versus = cpu[0] / cpu[-1], bare_cpu[0] / cpu[0]
        print(f"by CPU per job: first block / last: {flat:.2f}x (target >= {TARGET_FLAT}: "
              f"{'PASS' if flat >= TARGET_FLAT else 'FAIL'}); bare / gridfleet (first blocks): {versus:.2f}x "
              f"(target >= {TARGETS[backend]}: {'PASS' if versus >= TARGETS[backend] else 'FAIL'})")
    if backend == "postgres" and split and bare_split:  # where it went: worse for more workers than cores
        def parts(blocks: list[list[float]]) -> str:
            jobs = per_block * args.workers * len(blocks)
            return " / ".join(f"{sum(block[part] for block in blocks) / jobs * 1e6:.0f}" for part in (0, 1))
        print(f"CPU us per job over the run, worker processes / their backends: bare {parts(bare_split)}, "
              f"gridfleet {parts(split)}")
        print(f"WAL bytes per job (the server's, EXPLAINs included): bare {(wal[1] - wal[0]) / args.bare_jobs:.0f}, "
              f"gridfleet {(wal[3] - wal[2]) / args.jobs:.0f}")
    if rates and bare_rates:
        flat, versus = rates[-1] / rates[0], rates[0] / bare_rates[0]
        print(f"by jobs/s: last block / first: {flat:.2f}x (target >= {TARGET_FLAT}: {'PASS' if flat >= TARGET_FLAT else 'FAIL'}); "
              f"gridfleet first block / bare first block: {versus:.2f}x (target >= {TARGETS[backend]}: "
              f"{'PASS' if versus >= TARGETS[backend] else 'FAIL'}); bare last / first: {bare_rates[-1] / bare_rates[0]:.2f}x")
    if explains:
        points = " / ".join(f"{n:,}" for n in sorted(explains))
        print(f"EXPLAIN buffers of the claim's pick after {points} finished jobs: from the claim floor "
              + " / ".join(str(explains[n]["floor"]) for n in sorted(explains)) + "; from the start "
              + " / ".join(str(explains[n]["start"]) for n in sorted(explains)) + "; the expiry scan "
              + " / ".join(str(explains[n]["expiry"]) for n in sorted(explains)) + "; a finish's fence "
              + " / ".join(str(explains[n].get("fence", "-")) for n in sorted(explains)))
        print(f"bare loop's pick: {before} buffers at 0, {after} after {args.bare_jobs:,} claimed")
    print(f"load average after: {load1()}")


def _wal_bytes(conn, backend: str) -> int:
    """Postgres: where the server's write-ahead log is now, in bytes (0 on SQLite)."""
    if backend == "sqlite":
        return 0
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0])


def _bare_buffers(conn, pick: str) -> int:
    with conn.transaction(force_rollback=True):
        row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + pick).fetchone()
    plan = row[0][0]["Plan"]
    return plan["Shared Hit Blocks"] + plan["Shared Read Blocks"]


if __name__ == "__main__":
    sys.exit(main())
