"""Queue throughput: claim+finish cycles per second and heartbeat latency, next to the issue's targets.

    .venv/bin/python bench/queue_throughput.py                      # everything, ~5 s per measurement
    .venv/bin/python bench/queue_throughput.py --quick              # a 2 s smoke run
    .venv/bin/python bench/queue_throughput.py --backends postgres,api --workers 1,16 --seconds 10
    .venv/bin/python bench/queue_throughput.py --backends api --uvicorn-workers 1,2   # compare server setups
    .venv/bin/python bench/queue_throughput.py --compare HEAD,. --rounds 2   # last commit vs this checkout
    .venv/bin/python bench/queue_throughput.py --gang 16            # gang claims of 16 beside single claims
                                                                    # (bench/gang_throughput.py)
    .venv/bin/python bench/queue_throughput.py --sustained          # 100,000 jobs without VACUUM, per block,
                                                                    # beside a bare loop (bench/queue_sustained.py)

What it measures
- cycles/s: N worker processes (separate OS processes, started together after warm-up) each loop
  `claim` -> `finish(succeeded)` on noop jobs for --seconds; the sum of cycles completed inside the
  window divided by the window. Backends:
    sqlite    directly through scheduler.queue.Queue on a SQLite file (WAL), in a temp directory
    postgres  directly through Queue on a fresh Postgres database (created here, dropped at the end)
    api       through the HTTP worker protocol (worker.client.ApiClient: httpx, keep-alive) against a
              real uvicorn subprocess on its own fresh Postgres database (or SQLite: --api-db sqlite)
- heartbeat latency: open loop through the API. --hb-clients processes each send --hb-rate/--hb-clients
  heartbeats per second on a fixed schedule, each for its own running job and attempt id. Latency is
  counted from the *scheduled* send time, so a slow server cannot hide behind a late client
  (no coordinated omission).
- targets (from the issue): Postgres direct >= 1,000 cycles/s, API >= 250 cycles/s, heartbeat
  p99 < 50 ms at 100 heartbeats/s. Printed as measured/target (for latency, below 1.00x passes).
- where the CPU went (Linux /proc): CPU ms per operation in the workers, the uvicorn process tree and
  the Postgres backends, the machine's busy cores and how much of that was not this benchmark.

Everything (workers, uvicorn, Postgres, the clients) shares this machine's cores, so cycles/s is a floor
for a real deployment and noisy when anything else runs here (see "not ours" and load1 in the CPU table);
CPU ms per cycle is the steadier number to compare. The script cleans up its server, its databases, its
processes and its temp files, also on Ctrl-C and SIGTERM. See bench/README.md for findings.
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.processes import (  # noqa: E402 - after the sys.path set-up above
    Cleanup, CpuProbe, Group, _database_name, _ignore_sigint_in_child, create_pg_database, create_sqlite_database,
    free_port, load1, pg_server_version, pg_setting, versions,
)
from bench.queue_report import (  # noqa: E402
    TARGET_HB_RATE, print_cpu_table, print_cycle_table, print_heartbeat_table, print_summary,
)

PG_ADMIN_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
MAX_JOBS_PER_GRID = 100_000  # scheduler.spec.MAX_JOBS_PER_GRID
WARMUP_CYCLES = 3  # per worker, before the measured window (connections, caches, the first claim)


# ---- code variants (--compare) ---------------------------------------------------------------------
PROJECT_PACKAGES = ("api", "common", "scheduler", "worker")


def use_code(code_dir: str | None) -> None:
    """In a worker process: import the project from code_dir (another revision) instead of this checkout.
    The fork server preloaded this checkout's modules; they are dropped so the imports below reload them."""
    if code_dir is None:
        return
    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES:
            del sys.modules[name]
    sys.path.insert(0, code_dir)


def prepare_variants(specs: list[str], cleanup: "Cleanup") -> list[tuple[str, str | None]]:
    """(name, code_dir) per --compare entry: "." is this checkout (None), a directory is used as is,
    anything else is a git ref, exported with `git archive` into a temp dir (git state is not touched)."""
    import io
    import tarfile

    variants: list[tuple[str, str | None]] = []
    for spec in specs:
        if spec == ".":
            variants.append((".", None))
        elif os.path.isdir(spec):
            variants.append((os.path.basename(os.path.normpath(spec)), os.path.abspath(spec)))
        else:
            archive = subprocess.run(["git", "archive", "--format=tar", spec], cwd=ROOT, capture_output=True, check=True)
            directory = tempfile.mkdtemp(prefix="gf_bench_code_")
            cleanup.tempdirs.append(directory)
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(directory)
            variants.append((spec, directory))
    return variants


# ---- processes: one cycle worker ---------------------------------------------------------------------
def cycle_worker(kind: str, target: str, token: str, code_dir: str | None, go, times, results, index: int) -> None:
    """One worker process: set up, warm up, wait for `go`, then claim+finish until the window closes."""
    _ignore_sigint_in_child()
    out: dict[str, Any] = {"index": index, "cycles": 0, "dry": 0, "errors": 0, "error": None,
                           "cycle": [], "claim": [], "finish": []}
    try:
        use_code(code_dir)
        if kind == "api":
            from worker.client import ApiClient

            client = ApiClient(target, token, retry_for=2.0, timeout=30.0)
            worker_id = client.register({"name": f"bench-{index}", "host": "bench", "trainers": ["noop"]})["worker_id"]

            def claim():
                return client.claim(worker_id, trainers=["noop"])

            def finish(job):
                reply = client.finish(worker_id, job_id=job["id"], attempt_id=job["attempt_id"], outcome="succeeded",
                                      result={"loss": 0.0})
                if not reply.get("ok"):
                    raise RuntimeError(f"finish refused: {reply}")

            def close():
                client.close()
        else:
            from common.db import make_engine
            from scheduler.policy import RetryPolicy
            from scheduler.queue import Queue

            engine = make_engine(target)
            job_queue = Queue(engine, RetryPolicy())
            worker_id = job_queue.register_worker(name=f"bench-{index}", host="bench", trainers=["noop"])
            # Fenced writes name the worker; code from before that (--compare) takes no worker_id.
            fence = {"worker_id": worker_id} if "worker_id" in inspect.signature(Queue.finish).parameters else {}

            def claim():
                job = job_queue.claim(worker_id, trainers=["noop"])
                return None if job is None else {"id": job.id, "attempt_id": job.attempt_id}

            def finish(job):
                reply = job_queue.finish(job["id"], job["attempt_id"], "succeeded", {"loss": 0.0}, **fence)
                if not reply.ok:
                    raise RuntimeError(f"finish refused: {reply.reason}")

            def close():
                engine.dispose()

        for _ in range(WARMUP_CYCLES):
            job = claim()
            if job is not None:
                finish(job)
        results.put(("ready", index))
        go.wait()
        start_at, end_at = times[0], times[1]
        while time.time() < start_at:
            time.sleep(max(0.0, min(0.01, start_at - time.time())))
        perf = time.perf_counter
        cpu0 = time.process_time()
        while time.time() < end_at:
            t0 = perf()
            try:
                job = claim()
                t1 = perf()
                if job is None:
                    out["dry"] += 1
                    time.sleep(0.005)
                    continue
                finish(job)
            except Exception as exc:  # noqa: BLE001 - count it, keep going, report the first one
                out["errors"] += 1
                out["error"] = out["error"] or f"{type(exc).__name__}: {str(exc)[:300]}"
                time.sleep(0.01)
                continue
            t2 = perf()
            if time.time() <= end_at:
                out["cycles"] += 1
                out["cycle"].append(t2 - t0)
                out["claim"].append(t1 - t0)
                out["finish"].append(t2 - t1)
        out["cpu"] = time.process_time() - cpu0
        time.sleep(max(0.0, end_at + 1.0 - time.time()))  # keep connections open until the parent's last CPU probe
        close()
    except Exception as exc:  # noqa: BLE001 - setup failed: report it instead of hanging the parent
        out["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        out["fatal"] = True
        results.put(("ready", index))
    results.put(("done", out))


# ---- processes: one heartbeat client ---------------------------------------------------------------
def heartbeat_client(base_url: str, token: str, worker_id: str, worker_secret: str, job_id: int, attempt_id: str,
                     rate: float, offset: float, go, times, results, index: int) -> None:
    """Open loop: send at start + offset + k/rate regardless of how long earlier replies took."""
    _ignore_sigint_in_child()
    out: dict[str, Any] = {"index": index, "sent": 0, "ok": 0, "errors": 0, "error": None, "latency": [],
                           "service": [], "late": 0}
    try:
        import httpx

        from worker.client import WORKER_SECRET_HEADER

        http = httpx.Client(base_url=base_url.rstrip("/") + "/api/v1",
                            headers={"Authorization": f"Bearer {token}", WORKER_SECRET_HEADER: worker_secret},
                            timeout=10.0)
        path = f"/workers/{worker_id}/heartbeat"
        step = 0

        def beat() -> None:
            nonlocal step
            step += 1
            response = http.post(path, json={"job_id": job_id, "attempt_id": attempt_id, "step": step,
                                             "progress": [step, 1_000_000]})
            if response.status_code != 200:
                raise RuntimeError(f"heartbeat: {response.status_code} {response.text[:200]}")

        for _ in range(3):  # warm-up: connection, token cache, JIT-free paths
            beat()
        results.put(("ready", index))
        go.wait()
        start_at, end_at = times[0], times[1]
        interval = 1.0 / rate
        k = 0
        cpu0 = time.process_time()
        while True:
            scheduled = start_at + offset + k * interval
            if scheduled >= end_at:
                break
            k += 1
            delay = scheduled - time.time()
            if delay > 0:
                time.sleep(delay)
            elif delay < -interval:
                out["late"] += 1  # we could not even send on time (the client itself was starved)
            sent = time.time()
            out["sent"] += 1
            try:
                beat()
            except Exception as exc:  # noqa: BLE001
                out["errors"] += 1
                out["error"] = out["error"] or f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            done = time.time()
            out["ok"] += 1
            out["latency"].append(done - scheduled)
            out["service"].append(done - sent)
        out["cpu"] = time.process_time() - cpu0
        time.sleep(max(0.0, end_at + 1.0 - time.time()))
        http.close()
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        out["fatal"] = True
        results.put(("ready", index))
    results.put(("done", out))


class JobFeeder:
    """Makes sure enough queued noop jobs exist before each window (grids of at most 100,000 jobs).

    Direct backends submit with scheduler.grids.submit_grid, which refreshes the planner's statistics after
    adding many jobs (unless --no-analyze); the API backend submits through POST /grids itself.
    """

    def __init__(self, url: str, analyze: bool = True, vacuum: bool = True):
        from common.db import is_sqlite, make_engine

        self.engine = make_engine(url)
        self.analyze = analyze
        self.vacuum = vacuum and not is_sqlite(url)
        self.http = None
        self.grids = 0

    def via_api(self, base_url: str | None, token: str | None) -> None:
        import httpx

        if self.http is not None:
            self.http.close()
        self.http = None if base_url is None else httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=600.0)

    def queued(self) -> int:
        from sqlalchemy import func, select

        from common import schema as t

        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(t.jobs).where(t.jobs.c.state == "queued")).scalar_one()

    def vacuum_tables(self) -> None:
        """VACUUM the queue's tables, as autovacuum would between bursts (Postgres). Each claimed job leaves a
        dead entry at the front of claimable's key that a claim from the first job walks over until a vacuum; without
        this, each window would pay for all the windows before it (and autovacuum may be off on a dev server)."""
        if not self.vacuum:
            return
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in ("jobs", "claimable", "running", "attempts", "workers", "events"):
                conn.execute(text(f"VACUUM {table}"))

    def ensure(self, wanted: int) -> float:
        """Top up to `wanted` queued jobs; returns seconds spent."""
        from scheduler.grids import submit_grid
        from scheduler.spec import GridSpec
        from worker.trainers import validate_config

        started = time.perf_counter()
        missing = wanted - self.queued()
        while missing > 0:
            count = min(missing, MAX_JOBS_PER_GRID)
            self.grids += 1
            body = {"name": f"bench-{self.grids}-{uuid.uuid4().hex[:6]}", "trainer": "noop",
                    "axes": {"value": [float(i) for i in range(count)]}}
            if self.http is not None:
                response = self.http.post("/grids", json=body)
                if response.status_code >= 300:
                    raise RuntimeError(f"POST /grids: {response.status_code} {response.text[:500]}")
                created = response.json()["created"]
            else:
                created = submit_grid(self.engine, GridSpec.model_validate(body), validate_config,
                                      analyze=self.analyze).created
            missing -= created
        return time.perf_counter() - started

    def close(self) -> None:
        self.via_api(None, None)
        self.engine.dispose()


# ---- the API server -------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    token: str
    admin_token: str
    process: subprocess.Popen
    log_path: str
    workers: int


def start_server(cleanup: Cleanup, db_url: str, uvicorn_workers: int, workdir: str,
                 code_dir: str | None = None) -> Server:
    import httpx

    from api.tokens import create_token
    from common.db import make_engine

    engine = make_engine(db_url)
    try:
        _, token = create_token(engine, "worker", "bench worker")
    finally:
        engine.dispose()
    port = free_port()
    admin_token = "gf_bench_admin_" + uuid.uuid4().hex
    env = dict(os.environ)
    env.update({
        "GRIDFLEET_DATABASE_URL": db_url, "DATABASE_URL": db_url,
        "GRIDFLEET_ADMIN_TOKEN": admin_token,  # the server stores it; the bench submits grids with it
        "GRIDFLEET_HOME": workdir,
        "PYTHONPATH": (code_dir or str(ROOT)) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    log_path = os.path.join(workdir, f"uvicorn-{uvicorn_workers}-{port}.log")
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(uvicorn_workers), "--no-access-log", "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    cleanup.servers.append(process)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited with code {process.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"uvicorn did not answer /healthz within 90 s:\n{Path(log_path).read_text()[-3000:]}")
        time.sleep(0.2)
    if uvicorn_workers > 1:
        time.sleep(1.5)  # healthz answered from one worker process; give the others time to finish start-up
    return Server(url=url, token=token, admin_token=admin_token, process=process, log_path=log_path, workers=uvicorn_workers)


# ---- measurements -----------------------------------------------------------------------------------
@dataclass
class CycleRow:
    label: str
    backend: str  # sqlite | postgres | api
    workers: int
    rate: float
    cycle: list[float]
    claim: list[float]
    finish: list[float]
    errors: int
    dry: int
    error: str | None
    load: str
    uvicorn_workers: int | None = None
    cpu: dict = field(default_factory=dict)  # CPU seconds in the window: client, server, pg, machine
    variant: str = "."  # which code (--compare)


def measure_cycles(ctx, cleanup: Cleanup, backend: str, label: str, target: str, token: str, workers: int,
                   seconds: float, feeder: JobFeeder, rate_guess: float, probe: CpuProbe,
                   uvicorn_workers: int | None = None, variant: tuple[str, str | None] = (".", None)) -> CycleRow:
    needed = int(rate_guess * (seconds + 3) * 1.5) + workers * (WARMUP_CYCLES + 5)
    feeder.ensure(min(needed, 5 * MAX_JOBS_PER_GRID))
    feeder.vacuum_tables()
    load = load1()
    group = Group(ctx, cleanup)
    group.start(cycle_worker, [(backend if backend == "api" else "direct", target, token, variant[1])
                               for _ in range(workers)])
    outs, usage = group.run(seconds, probe)
    fatal = [o["error"] for o in outs if o.get("fatal")]
    if fatal:
        raise RuntimeError(f"{label}: a worker could not start: {fatal[0]}")
    usage["client"] = sum(o.get("cpu", 0.0) for o in outs)
    cycles = sum(o["cycles"] for o in outs)
    row = CycleRow(
        label=label, backend=backend, workers=workers, rate=cycles / seconds,
        cycle=[x for o in outs for x in o["cycle"]], claim=[x for o in outs for x in o["claim"]],
        finish=[x for o in outs for x in o["finish"]], errors=sum(o["errors"] for o in outs),
        dry=sum(o["dry"] for o in outs), error=next((o["error"] for o in outs if o["error"]), None), load=load,
        uvicorn_workers=uvicorn_workers, cpu=usage, variant=variant[0],
    )
    return row


@dataclass
class HeartbeatRow:
    label: str
    uvicorn_workers: int
    clients: int
    target_rate: float
    sent: int
    ok: int
    seconds: float
    latency: list[float]
    service: list[float]
    errors: int
    late: int
    error: str | None
    load: str
    cpu: dict = field(default_factory=dict)
    variant: str = "."


def measure_heartbeats(ctx, cleanup: Cleanup, server: Server, clients: int, rate: float, seconds: float,
                       label: str, probe: CpuProbe, variant: str = ".") -> HeartbeatRow:
    from worker.client import ApiClient

    # Each client beats for its own running job with its own attempt id (claimed through the API).
    setup = ApiClient(server.url, server.token, retry_for=5.0)
    jobs = []
    try:
        for i in range(clients):
            registered = setup.register({"name": f"bench-hb-{i}", "host": "bench", "trainers": ["noop"]})
            worker_id = registered["worker_id"]
            job = setup.claim(worker_id, trainers=["noop"])  # the client speaks for the worker it registered last
            if job is None:
                raise RuntimeError("no queued job left for the heartbeat clients")
            jobs.append((worker_id, registered.get("worker_secret", ""), job["id"], job["attempt_id"]))
    finally:
        setup.close()
    per_client = rate / clients
    load = load1()
    group = Group(ctx, cleanup)
    # Stagger the clients evenly over one interval so the offered load is smooth, not 10 at once.
    group.start(heartbeat_client, [
        (server.url, server.token, worker_id, secret, job_id, attempt_id, per_client, i / rate)
        for i, (worker_id, secret, job_id, attempt_id) in enumerate(jobs)
    ])
    outs, usage = group.run(seconds, probe)
    fatal = [o["error"] for o in outs if o.get("fatal")]
    if fatal:
        raise RuntimeError(f"{label}: a heartbeat client could not start: {fatal[0]}")
    usage["client"] = sum(o.get("cpu", 0.0) for o in outs)
    return HeartbeatRow(
        label=label, uvicorn_workers=server.workers, clients=clients, target_rate=rate,
        sent=sum(o["sent"] for o in outs), ok=sum(o["ok"] for o in outs), seconds=seconds,
        latency=[x for o in outs for x in o["latency"]], service=[x for o in outs for x in o["service"]],
        errors=sum(o["errors"] for o in outs), late=sum(o["late"] for o in outs),
        error=next((o["error"] for o in outs if o["error"]), None), load=load, cpu=usage, variant=variant,
    )


# ---- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="length of each measured window (default 5)")
    parser.add_argument("--workers", default=None, help="comma-separated worker process counts (default 1,4,16)")
    parser.add_argument("--backends", default="sqlite,postgres,api",
                        help="comma-separated subset of sqlite,postgres,api (default: all)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 2 s windows, workers 1,4")
    parser.add_argument("--uvicorn-workers", default="1",
                        help="comma-separated uvicorn --workers values to run the API rows with (default 1: "
                             "measured best on a 2-core machine; try 1,2)")
    parser.add_argument("--api-db", choices=("postgres", "sqlite"), default="postgres",
                        help="the database behind the API server (default postgres)")
    parser.add_argument("--hb-rate", type=float, default=TARGET_HB_RATE, help="heartbeats per second offered (100)")
    parser.add_argument("--hb-clients", type=int, default=10, help="heartbeat client processes (10)")
    parser.add_argument("--no-analyze", action="store_true",
                        help="direct backends: do not ANALYZE after submitting jobs (submit_grid does); shows the "
                             "stale-statistics claim plan on Postgres")
    parser.add_argument("--no-heartbeat", action="store_true", help="skip the heartbeat latency measurement")
    parser.add_argument("--gang", type=int, default=None, metavar="K",
                        help="instead: gang claims of K jobs beside single claims on Postgres (bench/gang_throughput.py)")
    parser.add_argument("--sustained", action="store_true",
                        help="instead: 100,000 jobs in one go without VACUUM, per 10,000-job block, beside a bare "
                             "loop, on sqlite and postgres (bench/queue_sustained.py; pass its options after --)")
    parser.add_argument("--no-vacuum", action="store_true",
                        help="Postgres: do not VACUUM the queue's tables before each window (see JobFeeder.vacuum_tables)")
    parser.add_argument("--compare", default=".",
                        help="comma-separated code variants measured side by side, alternating within one run: "
                             "'.' (this checkout), a git ref (exported with git archive) or a directory holding "
                             "another copy of the project; e.g. --compare HEAD,. (default: .)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat each measurement this many times, alternating the --compare variants (1)")
    parser.add_argument("--pg-admin-url", default=os.environ.get("GRIDFLEET_BENCH_POSTGRES_URL", PG_ADMIN_URL_DEFAULT),
                        help="a Postgres URL allowed to CREATE/DROP DATABASE (env GRIDFLEET_BENCH_POSTGRES_URL)")
    args, rest = parser.parse_known_args(argv)
    if rest and not args.sustained:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    rest = [x for x in rest if x != "--"]
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.workers = [int(x) for x in (args.workers or ("1,4" if args.quick else "1,4,16")).split(",") if x.strip()]
    args.backends = [x.strip() for x in args.backends.split(",") if x.strip()]
    unknown = set(args.backends) - {"sqlite", "postgres", "api"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}; choose from sqlite,postgres,api")
    args.uvicorn_workers = [int(x) for x in args.uvicorn_workers.split(",") if x.strip()]
    args.compare = [x.strip() for x in args.compare.split(",") if x.strip()] or ["."]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if min(args.workers) < 1 or min(args.uvicorn_workers) < 1 or args.hb_clients < 1:
        parser.error("worker and client counts must be at least 1")
    return args, rest


def report(args: argparse.Namespace, cycle_rows: list[CycleRow], hb_rows: list[HeartbeatRow]) -> None:
    if cycle_rows:
        print("claim+finish cycles per second (higher is better; latencies in ms per cycle, per worker)")
        print_cycle_table(cycle_rows)
    if hb_rows:
        print()
        print(f"heartbeat latency through the API, open loop: {args.hb_clients} client processes x "
              f"{args.hb_rate / args.hb_clients:g}/s, each for its own running job and attempt id; "
              "latency from the scheduled send time")
        print_heartbeat_table(hb_rows)
    print()
    print("where the CPU went (Linux /proc; the same windows as above)")
    print_cpu_table(cycle_rows, hb_rows)
    print()
    print_summary(cycle_rows, hb_rows)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.sustained:  # its own short file (bench/queue_sustained.py)
        from bench import queue_sustained

        return queue_sustained.main(["--pg-admin-url", args.pg_admin_url, *rest])
    if args.gang:  # its own short file (bench/gang_throughput.py); Postgres only
        from bench import gang_throughput

        return gang_throughput.main(["--k", str(args.gang), "--seconds", str(args.seconds),
                                     "--workers", ",".join(map(str, args.workers)), "--pg-admin-url", args.pg_admin_url])

    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (e.g. `cmd &`)
    ctx = mp.get_context("forkserver")
    # Preloaded once in the fork server, so each worker process starts in milliseconds, not seconds.
    ctx.set_forkserver_preload(["sqlalchemy", "psycopg", "httpx", "common.db", "scheduler.queue", "worker.client"])

    needs_pg = "postgres" in args.backends or ("api" in args.backends and args.api_db == "postgres")
    cleanup = Cleanup(admin_url=args.pg_admin_url)
    workdir = tempfile.mkdtemp(prefix="gf_bench_run_")
    cleanup.tempdirs.append(workdir)
    cycle_rows: list[CycleRow] = []
    hb_rows: list[HeartbeatRow] = []
    started = time.time()
    try:
        pg_version = pg_server_version(args.pg_admin_url) if needs_pg else None
        cpus = os.cpu_count()
        print(f"gridfleet queue throughput  {datetime.datetime.now().isoformat(timespec='seconds')}  "
              f"host {platform.node()}")
        print(f"os.cpu_count() = {cpus}: every worker process, the API server, Postgres and the heartbeat clients "
              f"share these {cpus} cores" + (" (and so does anything else running here)" if cpus and cpus <= 4 else ""))
        print(versions(pg_version))
        print(f"{args.seconds:g} s per measured window after warm-up; workers {', '.join(map(str, args.workers))}; "
              f"noop jobs; one cycle = claim + finish(succeeded); load average now {load1()}")
        if "api" in args.backends:
            print(f"API: uvicorn --workers {'/'.join(map(str, args.uvicorn_workers))} --no-access-log --log-level "
                  f"warning, on {args.api_db}; jobs submitted through POST /grids")
        if {"sqlite", "postgres"} & set(args.backends):
            print("direct: jobs submitted with scheduler.grids.submit_grid" +
                  (" (no ANALYZE: --no-analyze)" if args.no_analyze else ", which ANALYZEs jobs after adding many"))
        if needs_pg:
            print("Postgres: " + ("no VACUUM between windows (--no-vacuum)" if args.no_vacuum else
                                  "VACUUM of the queue's tables before each window") +
                  f"; the server's autovacuum is {pg_setting(args.pg_admin_url, 'autovacuum')}")
        print()

        variants = prepare_variants(args.compare, cleanup)
        if len(variants) > 1 or args.rounds > 1:
            print(f"code variants, alternating: {', '.join(name for name, _ in variants)}; {args.rounds} round(s)")
            print()

        def tagged(label: str, variant: tuple[str, str | None]) -> str:
            return label if len(variants) == 1 else f"{label} [{variant[0]}]"

        rate_guess = {"sqlite": 1500.0, "postgres": 2000.0, "api": 800.0}
        for backend in args.backends:
            if backend in ("sqlite", "postgres"):
                url = create_sqlite_database(cleanup) if backend == "sqlite" else create_pg_database(cleanup, "direct")
                label = "sqlite direct (WAL)" if backend == "sqlite" else "postgres direct"
                feeder = JobFeeder(url, analyze=not args.no_analyze, vacuum=not args.no_vacuum)
                probe = CpuProbe(pg_url=url if backend == "postgres" else None)
                try:
                    for workers in args.workers:
                        for _ in range(args.rounds):
                            for variant in variants:
                                print(f"... {tagged(label, variant)}, {workers} workers", file=sys.stderr, flush=True)
                                row = measure_cycles(ctx, cleanup, backend, tagged(label, variant), url, "", workers,
                                                     args.seconds, feeder, rate_guess[backend], probe, variant=variant)
                                rate_guess[backend] = max(rate_guess[backend], row.rate)
                                cycle_rows.append(row)
                finally:
                    feeder.close()
                    probe.close()
                if backend == "postgres":
                    cleanup.drop_database(_database_name(url))
                continue
            # api: one database; one server per uvicorn --workers value and code variant, all up at once
            url = create_pg_database(cleanup, "api") if args.api_db == "postgres" else create_sqlite_database(cleanup)
            feeder = JobFeeder(url, vacuum=not args.no_vacuum)
            try:
                for uvicorn_workers in args.uvicorn_workers:
                    servers = []
                    try:
                        for variant in variants:
                            print(f"... starting uvicorn --workers {uvicorn_workers} ({variant[0]})", file=sys.stderr,
                                  flush=True)
                            server = start_server(cleanup, url, uvicorn_workers, workdir, variant[1])
                            probe = CpuProbe(server_pid=server.process.pid,
                                             pg_url=url if args.api_db == "postgres" else None)
                            servers.append((variant, server, probe,
                                            tagged(f"api ({args.api_db}, uvicorn x{uvicorn_workers})", variant)))
                        for workers in args.workers:
                            for _ in range(args.rounds):
                                for variant, server, probe, label in servers:
                                    print(f"... {label}, {workers} workers", file=sys.stderr, flush=True)
                                    feeder.via_api(server.url, server.admin_token)
                                    row = measure_cycles(ctx, cleanup, "api", label, server.url, server.token, workers,
                                                         args.seconds, feeder, rate_guess["api"], probe,
                                                         uvicorn_workers, variant)
                                    rate_guess["api"] = max(rate_guess["api"], row.rate)
                                    cycle_rows.append(row)
                        if not args.no_heartbeat:
                            for _ in range(args.rounds):
                                for variant, server, probe, label in servers:
                                    print(f"... heartbeats through {label}", file=sys.stderr, flush=True)
                                    feeder.via_api(server.url, server.admin_token)
                                    feeder.ensure(args.hb_clients + 10)
                                    hb_rows.append(measure_heartbeats(ctx, cleanup, server, args.hb_clients,
                                                                      args.hb_rate, max(args.seconds, 5.0), label,
                                                                      probe, variant[0]))
                    finally:
                        feeder.via_api(None, None)
                        for variant, server, probe, label in servers:
                            probe.close()
                            cleanup.stop_server(server.process)
                            log = Path(server.log_path).read_text(errors="replace").strip()
                            if log:
                                print(f"uvicorn --workers {uvicorn_workers} ({variant[0]}) logged:\n{log[-2000:]}",
                                      file=sys.stderr)
            finally:
                feeder.close()
            if args.api_db == "postgres":
                cleanup.drop_database(_database_name(url))

        report(args, cycle_rows, hb_rows)
        print()
        print(f"done in {time.time() - started:.0f} s; load average now {load1()} "
              f"(numbers are noisy when other work shares the {os.cpu_count()} cores)")
        return 0
    except BaseException as exc:
        if cycle_rows or hb_rows:
            print("\npartial results (the run stopped early):")
            report(args, cycle_rows, hb_rows)
        if isinstance(exc, KeyboardInterrupt):
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup.run()
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
