"""Postgres claim+finish of a git ref, of this tree and of the bare loop, taking turns in one run (issue 15).

    .venv/bin/python bench/queue_interleaved.py --base HEAD~3 --turns 10 --cycles 1500
    .venv/bin/python bench/queue_interleaved.py --workers 4 --turns 8 --cycles 4000   # 4 processes a side

Three sides (the bare loop of bench/queue_sustained.py, gridfleet at `--base` extracted with git archive,
gridfleet of this working tree), each on a fresh database of its own, run `--cycles` claim+finish cycles in
turns, the order reversed every turn, so the machine's load moves all three alike. With `--workers N` a
side is N processes on its database, racing for its jobs, the turn's cycles shared among them (its CPU
summed, its wall time the slowest process's).
A gridfleet side whose Queue has `finish_and_claim` cycles through it (each finish claims the next job, as the
embedded agent does); an older one runs claim then finish. Printed per turn: CPU us
per cycle of each process and its Postgres backends (/proc, local server), and the medians: bare/gridfleet
by CPU per job and by jobs/s, and this tree / base. A change worth a few percent shows here when runs
minutes apart differ by 2x (bench/README.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if "--serve" not in sys.argv and str(ROOT) not in sys.path:  # a side imports its own tree (PYTHONPATH)
    sys.path.insert(0, str(ROOT))

from bench.processes import PG_ADMIN_URL_DEFAULT  # noqa: E402


def serve(kind: str, admin_url: str, cycles: int, attach: str | None = None) -> None:
    """One process of a side, run from its own tree: set up a database (or, `attach`, join the one another
    process of the side set up), answer `ready NAME`, then run `run N` turns until `run 0`."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from bench.processes import proc_cpu
    from common.db import make_engine, migrate, normalize_url

    import scheduler.queue
    print(f"{kind} runs {Path(scheduler.queue.__file__).parent.parent}", file=sys.stderr)

    name = attach or f"gf_bench_{os.getpid()}_interleaved_{uuid.uuid4().hex[:6]}"
    admin = create_engine(normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    if attach is None:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalize_url(admin_url)).set(database=name).render_as_string(hide_password=False)
    close = []
    try:
        side = _bare_side if kind == "bare" else _gridfleet_side
        cycle, pids = side(url, cycles + 1_000, migrate if attach is None else None, make_engine, close)
        print(f"ready {name}", flush=True)
        for line in sys.stdin:
            n = int(line.split()[1])
            if n == 0:
                break
            cpu, backends, started = time.process_time(), sum(proc_cpu(p) or 0.0 for p in pids), time.time()
            for _ in range(n):
                cycle()
            print(time.process_time() - cpu, sum(proc_cpu(p) or 0.0 for p in pids) - backends, time.time() - started,
                  flush=True)
    finally:
        for done in close:
            done()
        if attach is None:  # the side's other processes have gone first (_compare ends them in reverse)
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def _bare_side(url: str, rows: int, migrate, _make_engine, close: list):
    """`migrate` None: another process of the side created the table."""
    import psycopg
    from sqlalchemy.engine import make_url

    from bench.queue_sustained import BARE_CLAIM, BARE_FINISH, BARE_PG

    conn = psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False), autocommit=True,
                           prepare_threshold=0)
    close.append(conn.close)
    for statement in BARE_PG["setup"] if migrate else []:
        conn.execute(statement.format(n=rows))
    claim, finish = BARE_CLAIM.format(pick=BARE_PG["pick"]), BARE_FINISH.format(param="%s")

    def cycle():
        row = conn.execute(claim).fetchone()
        conn.execute(finish, (row[0],))
    return cycle, [conn.info.backend_pid]


def _submit_noop_grid(engine, jobs: int) -> None:
    """One grid of `jobs` noop jobs: what a gridfleet side claims."""
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    submit_grid(engine, GridSpec.model_validate({"name": "interleaved", "trainer": "noop",
                                                 "axes": {"value": [float(i) for i in range(jobs)]}}),
                validate_config)


def _gridfleet_side(url: str, jobs: int, migrate, make_engine, close: list):
    """`migrate` None: another process of the side migrated the database and submitted the jobs."""
    from scheduler.queue import Queue

    engine = make_engine(url)
    close.append(engine.dispose)
    if migrate:
        migrate(url)
        _submit_noop_grid(engine, jobs)
    queue = Queue(engine)
    worker_id = queue.register_worker(name="bench", host="bench", trainers=["noop"])

    if not hasattr(queue, "finish_and_claim"):  # a base before it: claim, then finish
        def cycle():
            job = queue.claim(worker_id, trainers=["noop"])
            if not queue.finish(job.id, job.attempt_id, "succeeded", {"loss": 0.0}, worker_id=worker_id).ok:
                raise RuntimeError("finish refused")
    else:  # the embedded agent's cycle: each finish claims the next job
        held = [queue.claim(worker_id, trainers=["noop"])]

        def cycle():
            job = held[0]
            reply, held[0] = queue.finish_and_claim(job.id, job.attempt_id, "succeeded", {"loss": 0.0},
                                                    worker_id=worker_id, trainers=["noop"])
            if not reply.ok or held[0] is None:
                raise RuntimeError("finish refused" if not reply.ok else "no job left to claim")
    for _ in range(50):  # psycopg prepares after 5 runs
        cycle()
    return cycle, [c.info.backend_pid for c in queue._autocommit._open]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git ref to compare this working tree with (HEAD)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=1_500, help="claim+finish cycles per turn and side (1,500)")
    parser.add_argument("--workers", type=int, default=1, help="processes per side, sharing its turn's cycles (1)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("GRIDFLEET_BENCH_POSTGRES_URL", PG_ADMIN_URL_DEFAULT))
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one process of a side
    parser.add_argument("--attach", help=argparse.SUPPRESS)  # internal: the side's database, set up already
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= args.cycles:
        parser.error(f"--workers must be between 1 and --cycles ({args.cycles}): each process needs a cycle a "
                     f"turn; got {args.workers}")
    if args.serve:
        serve(args.serve, args.pg_admin_url, args.turns * args.cycles + 100 * args.workers, args.attach)
        return 0
    with tempfile.TemporaryDirectory(prefix="gf_bench_base_") as base:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        trees = {"bare": ROOT, "base": Path(base), "this": ROOT}
        return _compare(trees, args)


def _compare(trees: dict[str, Path], args) -> int:
    sides: dict[str, list[subprocess.Popen]] = {}
    share = args.cycles // args.workers
    try:
        for name, tree in trees.items():
            sides[name], database = [], None
            for _ in range(args.workers):
                # this script serves every side (a base may predate it); the side's code comes from its tree
                command = [sys.executable, str(Path(__file__).resolve()), "--serve",
                           "bare" if name == "bare" else "gridfleet", "--turns", str(args.turns), "--cycles",
                           str(args.cycles), "--workers", str(args.workers), "--pg-admin-url", args.pg_admin_url]
                if database:  # the side's first process made it
                    command += ["--attach", database]
                proc = subprocess.Popen(command, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                sides[name].append(proc)
                ready = proc.stdout.readline().split()
                if not ready or ready[0] != "ready":
                    raise RuntimeError(f"{name} failed to start")
                database = ready[1]
        turns = {name: [] for name in sides}
        for turn in range(args.turns):
            for name in (list(sides) if turn % 2 == 0 else list(reversed(sides))):
                for proc in sides[name]:  # all of a side's processes at once: they race for its jobs
                    proc.stdin.write(f"run {share}\n")
                    proc.stdin.flush()
                rows = [tuple(map(float, proc.stdout.readline().split())) for proc in sides[name]]
                cycles = share * len(rows)
                client, backends, wall = sum(r[0] for r in rows), sum(r[1] for r in rows), max(r[2] for r in rows)
                turns[name].append((client / cycles * 1e6, backends / cycles * 1e6, cycles / wall))
    finally:
        for procs in sides.values():
            for proc in reversed(procs):  # the one that made the database last: it drops it
                if proc.poll() is None:
                    proc.stdin.write("run 0\n")
                    proc.stdin.flush()
                    proc.wait(timeout=60)
    _report(turns, args)
    return 0


def _report(turns: dict[str, list[tuple[float, float, float]]], args) -> None:
    print(f"{args.turns} turns of {args.cycles:,} cycles, interleaved, {args.workers} process(es) a side; CPU us per "
          "cycle: client processes / their backends / total")
    for name, rows in turns.items():
        print(f"{name:<5} " + "  ".join(f"{c:.0f}/{b:.0f}/{c + b:.0f}" for c, b, _ in rows))
    total = {name: statistics.median(c + b for c, b, _ in rows) for name, rows in turns.items()}
    rate = {name: statistics.median(r for _, _, r in rows) for name, rows in turns.items()}
    print(f"bare: median {total['bare']:.0f} us per cycle, {rate['bare']:.0f} jobs/s")
    for name in ("base", "this"):
        client = statistics.median(c for c, _, _ in turns[name])
        backends = statistics.median(b for _, b, _ in turns[name])
        print(f"{name}: median {total[name]:.0f} us per cycle (client {client:.0f}, backends {backends:.0f}), "
              f"{rate[name]:.0f} jobs/s; bare/{name} by CPU {total['bare'] / total[name]:.2f}x (target >= 0.8), "
              f"by jobs/s {rate[name] / rate['bare']:.2f}x")
    per_turn = " ".join(f"{(t[0] + t[1]) / (b[0] + b[1]):.2f}" for t, b in zip(turns["this"], turns["base"]))
    print(f"this/base by CPU: median {total['this'] / total['base']:.2f}x; per turn {per_turn}")


if __name__ == "__main__":
    sys.exit(main())
