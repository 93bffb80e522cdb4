"""Gang claims: claim+finish jobs per second on Postgres, gangs of K beside one job at a time, in one run.

    .venv/bin/python bench/queue_throughput.py --gang 16                # the same, from the queue bench
    .venv/bin/python bench/gang_throughput.py --k 16 --workers 1,4 --seconds 5

What it measures: N worker processes (started together after warm-up) each loop for --seconds
    single   Queue.claim -> Queue.finish(succeeded): today's path, one job per cycle
    gang-1   claim_gang(K=1) -> finish_gang: the gang statements with one member (should match `single`)
    gang-K   claim_gang(K) -> finish_gang: K jobs of one grid and fuse key per claim and per finish
directly through the queue (scheduler/queue.py, scheduler/gang.py) on a fresh Postgres database created
here and dropped at the end. jobs/s = jobs finished inside the window / window; the ratio is against
`single` measured in the same run. The last line is PgQueuer's batched consumer (bench/pgqueuer_consumer.py)
on the same server, one QueueManager draining as many no-op jobs as gang-K's grid holds, in batches of K
(its start-up counts: 900 jobs/s draining 5,000, 2,700 draining 20,000), when `pgqueuer` is installed (an
optional bench dependency, not gridfleet's), beside gang-K at 1 worker. Everything
shares this machine's cores with Postgres, so the numbers are floors; compare the ratios. See
bench/README.md.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.processes import MAX_JOBS_PER_GRID, PG_ADMIN_URL_DEFAULT, SPAWN  # noqa: E402

WARMUP = 3  # claims per worker before the window (connections, prepared statements)


def _worker(url: str, mode: str, k: int, go, times, results) -> None:
    from common.db import make_engine
    from scheduler.gang import MemberFinish, claim_gang, finish_gang
    from scheduler.policy import RetryPolicy
    from scheduler.queue import Queue

    engine = make_engine(url)
    queue = Queue(engine, RetryPolicy())
    worker_id = queue.register_worker(name=f"bench-{mode}", host="bench", trainers=["noop"])

    def cycle() -> int:
        if mode == "single":
            job = queue.claim(worker_id, trainers=["noop"])
            if job is None:
                return 0
            if not queue.finish(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=worker_id).ok:
                raise RuntimeError("finish refused")
            return 1
        gang = claim_gang(queue, worker_id, k, trainers=["noop"])
        if gang:
            replies = finish_gang(queue, worker_id, [MemberFinish(j.id, j.attempt_id, "succeeded", {"loss": 0.0})
                                                     for j in gang])
            if not all(r.ok for r in replies):
                raise RuntimeError("finish refused")
        return len(gang)

    for _ in range(WARMUP):
        cycle()
    results.put("ready")
    go.wait()
    start_at, end_at = times[0], times[1]
    time.sleep(max(0.0, start_at - time.time()))
    jobs = dry = 0
    while time.time() < end_at:
        n = cycle()
        if time.time() <= end_at:
            jobs += n
            dry += n == 0
    results.put({"jobs": jobs, "dry": dry})
    queue.close()
    engine.dispose()


def measure(url: str, mode: str, k: int, workers: int, seconds: float) -> tuple[float, int]:
    """Jobs finished per second by `workers` processes in a window of `seconds`, and how many claims found
    nothing (a queue that ran dry would understate the rate)."""
    go, results, times = SPAWN.Event(), SPAWN.Queue(), SPAWN.Array("d", 2)
    procs = [SPAWN.Process(target=_worker, args=(url, mode, k, go, times, results), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        if results.get(timeout=120) != "ready":
            raise RuntimeError("a worker failed to start")
    times[0] = time.time() + 0.2
    times[1] = times[0] + seconds
    go.set()
    outs = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return sum(o["jobs"] for o in outs) / seconds, sum(o["dry"] for o in outs)


def _vacuum(engine) -> None:
    """Every run starts on a vacuumed, analyzed table (fresh statistics, no dead index entries to skip)."""
    from sqlalchemy import text

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))


def pgqueuer_line(url: str, jobs: int, k: int, gang_rate: float | None) -> str:
    """PgQueuer's batched consumer (one QueueManager, batches of K) on the same server, when installed."""
    from bench import pgqueuer_consumer

    if not pgqueuer_consumer.available():
        return "pgqueuer: not importable here (pip install pgqueuer: the bench extra); its consumer is not measured"
    rate = pgqueuer_consumer.measure(url.replace("+psycopg", ""), jobs, k)
    versus = f"; gang-{k} at 1 worker / pgqueuer: {gang_rate / rate:.2f}x" if gang_rate else ""
    return f"pgqueuer   1 consumer, batches of {k}, draining {jobs:,} no-op jobs: {rate:.0f} jobs/s{versus}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=16, help="jobs per gang (16)")
    parser.add_argument("--workers", default="1,4", help="comma-separated worker process counts (1,4)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured window (4)")
    parser.add_argument("--jobs", type=int, default=20_000,
                        help="queued jobs for each one-job mode; gang-K gets 5x, at most 100,000 (20,000)")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL_DEFAULT)
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error("--k: a gang bench needs K >= 2")

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from common.db import make_engine, migrate
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import fuse_key, validate_config

    name = f"gf_gang_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(args.pg_admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        engine = make_engine(url)
        modes = ["single", "gang-1", f"gang-{args.k}"]
        counts = [int(w) for w in args.workers.split(",")]
        runs = [(workers, mode) for workers in counts for mode in modes]
        grids = {}
        for workers, mode in runs:  # a grid per run, measured in id order (see below); gangs get more jobs
            n = args.jobs if mode in ("single", "gang-1") else min(MAX_JOBS_PER_GRID, 4 * args.jobs)
            spec = GridSpec.model_validate({"name": f"{mode}-{workers}", "trainer": "noop",
                                            "config": {"fuse_group": "bench"},
                                            "axes": {"value": [float(i) for i in range(n)]}})
            grids[workers, mode] = submit_grid(engine, spec, validate_config, fuse_key=fuse_key).grid_id
        _vacuum(engine)
        print(f"gang claims on Postgres: claim+finish of noop jobs, {args.seconds:.0f} s windows, "
              "dry claims > 0: the grid ran out")
        print(f"{'mode':<10} {'workers':>7} {'jobs/s':>9} {'vs single':>10} {'dry claims':>11}")
        base, gang_rate = None, None
        for workers, mode in runs:
            k = 1 if mode in ("single", "gang-1") else args.k
            rate, dry = measure(url, mode, k, workers, args.seconds)
            base = rate if mode == "single" else base
            gang_rate = rate if (workers, k) == (1, args.k) else gang_rate
            print(f"{mode:<10} {workers:>7} {rate:>9.0f} {rate / base if base else float('nan'):>9.2f}x {dry:>11}")
            # The next run's grid must be the first queued one in claim order, as a run's own grid was:
            # leftover queued jobs of earlier grids would make every later claim read past them.
            with engine.connect() as own:
                own.execute(text("DELETE FROM jobs WHERE grid_id = :g AND state = 'queued'"),
                            {"g": grids[workers, mode]})
                own.commit()
            _vacuum(engine)
        print(pgqueuer_line(url, min(MAX_JOBS_PER_GRID, 4 * args.jobs), args.k, gang_rate))  # gang-K's count
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
