"""Process plumbing shared by the queue benchmarks (bench/queue_throughput.py, bench/queue_sustained.py):
percentiles and small helpers, CPU accounting from /proc, a group of processes started together for one
window, the cleanup that must run even on Ctrl-C, fresh databases, and the version line.

Read `Group` (start, warm up, release together, collect) and `Cleanup` (servers, databases, processes and
temp dirs that go away at the end); the rest are small helpers.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# ---- small helpers ---------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of values; nan for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[index]


def ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def load1() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ignore_sigint_in_child() -> None:
    # Ctrl-C reaches the whole foreground process group; children stop when the parent tells them
    # to (or terminates them), so the parent alone decides and can clean up in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- CPU accounting (Linux /proc; elsewhere the CPU columns show "-") --------------------------------
PG_ADMIN_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
SPAWN = mp.get_context("spawn")  # bench processes start clean: no inherited connections or imports
MAX_JOBS_PER_GRID = 100_000  # scheduler.spec.MAX_JOBS_PER_GRID: larger feeds are split over several grids
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float | None:
    """user+system CPU seconds of one process, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def process_tree(root: int) -> list[int]:
    """root and all its descendants (uvicorn --workers N: the supervisor and its worker processes)."""
    parents: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [root]
    for name in entries:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [root], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        todo += children
    return tree


def machine_busy() -> float | None:
    """CPU seconds all cores spent busy since boot (everything on the machine, not only ours)."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10]) if len(values) > 9 else 0  # already counted in user/nice
    return (sum(values) - idle - guest) / CLK_TCK


class CpuProbe:
    """Snapshots of CPU seconds: the API server's process tree, the Postgres backends serving our database
    (only when Postgres runs on this machine) and the whole machine."""

    def __init__(self, server_pid: int | None = None, pg_url: str | None = None):
        self.server_pid = server_pid
        self.pg_engine = None
        if pg_url and _is_local(pg_url) and os.path.exists("/proc/self/stat"):
            from sqlalchemy import create_engine

            from common.db import normalize_url

            self.pg_engine = create_engine(normalize_url(pg_url), poolclass=_null_pool())
            self.pg_db = _database_name(pg_url)

    def __call__(self) -> dict:
        snap: dict = {"time": time.time(), "machine": machine_busy(), "server": None, "pg": None}
        if self.server_pid is not None:
            values = [proc_cpu(pid) for pid in process_tree(self.server_pid)]
            snap["server"] = {pid: v for pid, v in zip(process_tree(self.server_pid), values) if v is not None}
        if self.pg_engine is not None:
            from sqlalchemy import text

            with self.pg_engine.connect() as conn:
                pids = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :db AND pid <> "
                                         "pg_backend_pid()"), {"db": self.pg_db}).scalars().all()
                with contextlib.suppress(Exception):  # pg_stat_database.sessions: PostgreSQL 14+
                    snap["sessions"] = conn.execute(text("SELECT sessions FROM pg_stat_database WHERE datname = :db"),
                                                    {"db": self.pg_db}).scalar()
            snap["pg"] = {pid: v for pid in pids if (v := _postgres_cpu(pid)) is not None}
        return snap

    def close(self) -> None:
        if self.pg_engine is not None:
            self.pg_engine.dispose()


def _postgres_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            if not f.read().startswith("postgres"):
                return None
    except OSError:
        return None
    return proc_cpu(pid)


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


def _is_local(url: str) -> bool:
    from sqlalchemy.engine import make_url

    from common.db import normalize_url

    host = make_url(normalize_url(url)).host
    return host in (None, "", "localhost", "127.0.0.1", "::1")


def _database_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    from common.db import normalize_url

    return make_url(normalize_url(url)).database


def cpu_delta(first: dict, last: dict) -> dict:
    """CPU seconds used between two probe snapshots, per part; a process born in between counts whole."""
    out: dict = {"seconds": last["time"] - first["time"]}
    if first["machine"] is not None and last["machine"] is not None:
        out["machine"] = last["machine"] - first["machine"]
    if first.get("sessions") is not None and last.get("sessions") is not None:
        out["connections"] = last["sessions"] - first["sessions"] - 1  # minus the probe's own connection
    for part in ("server", "pg"):
        if last[part] is not None:
            before = first[part] or {}
            out[part] = sum(v - before.get(pid, 0.0) for pid, v in last[part].items())
    return out


# ---- running a group of processes together ---------------------------------------------------------
class Group:
    """Start processes, wait until all are warmed up, release them together for a window, collect."""

    def __init__(self, ctx, cleanup: Cleanup):
        self.ctx = ctx
        self.cleanup = cleanup
        self.go = ctx.Event()
        self.times = ctx.Array("d", 2)
        self.results = ctx.Queue()
        self.procs: list[mp.Process] = []

    def start(self, target, args_list: list[tuple]) -> None:
        for args in args_list:
            proc = self.ctx.Process(target=target, args=(*args, self.go, self.times, self.results, len(self.procs)),
                                    daemon=True)
            proc.start()
            self.procs.append(proc)
            self.cleanup.processes.append(proc)

    def run(self, seconds: float, probe=None, ready_timeout: float = 120.0) -> tuple[list[dict[str, Any]], dict]:
        """Returns each process's report and probe() taken at the window's start and end (if given)."""
        outs: list[dict[str, Any]] = []
        ready = 0
        deadline = time.time() + ready_timeout
        while ready < len(self.procs):
            self._check_alive()
            try:
                kind, payload = self.results.get(timeout=max(0.1, min(1.0, deadline - time.time())))
            except queue.Empty:
                if time.time() > deadline:
                    raise RuntimeError(f"only {ready} of {len(self.procs)} processes got ready in {ready_timeout:.0f} s")
                continue
            if kind == "ready":
                ready += 1
            else:
                outs.append(payload)
        start_at = time.time() + 0.3
        self.times[0], self.times[1] = start_at, start_at + seconds
        self.go.set()
        usage: dict = {}
        if probe is not None:
            time.sleep(max(0.0, start_at - time.time()))
            first = probe()
            time.sleep(max(0.0, start_at + seconds - time.time()))
            usage = cpu_delta(first, probe())
        deadline = start_at + seconds + 60.0
        while len(outs) < len(self.procs):
            try:
                kind, payload = self.results.get(timeout=1.0)
            except queue.Empty:
                if time.time() > deadline:
                    raise RuntimeError("processes did not report within 60 s after the window")
                self._check_alive(allow_exit=True)
                continue
            if kind == "done":
                outs.append(payload)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
            with contextlib.suppress(ValueError):
                self.cleanup.processes.remove(proc)
        return outs, usage

    def _check_alive(self, allow_exit: bool = False) -> None:
        for proc in self.procs:
            if not proc.is_alive() and proc.exitcode not in (0, None) and not allow_exit:
                raise RuntimeError(f"a benchmark process died with exit code {proc.exitcode}")


# ---- resources that must go away, even on Ctrl-C -----------------------------------------------------
@dataclass
class Cleanup:
    admin_url: str
    databases: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen] = field(default_factory=list)
    processes: list[mp.Process] = field(default_factory=list)
    tempdirs: list[str] = field(default_factory=list)

    def stop_processes(self) -> None:
        for proc in list(self.processes):
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.processes.clear()

    def stop_server(self, server: subprocess.Popen) -> None:
        self.stop_processes()  # clients first, so none of them retries against a server that is going away
        if server.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)  # its own session: uvicorn and its worker processes
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=5)
        else:  # the supervisor is gone; make sure no worker of its group lingers
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            self.servers.remove(server)

    def drop_database(self, name: str) -> None:
        from sqlalchemy import create_engine, text

        from common.db import normalize_url

        admin = create_engine(normalize_url(self.admin_url), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()
        with contextlib.suppress(ValueError):
            self.databases.remove(name)

    def run(self) -> None:
        self.stop_processes()
        for server in list(self.servers):
            try:
                self.stop_server(server)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: could not stop the API server (pid {server.pid}): {exc}", file=sys.stderr)
        for name in list(self.databases):
            try:
                self.drop_database(name)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: could not drop database {name}: {exc}; drop it by hand", file=sys.stderr)
        for path in self.tempdirs:
            shutil.rmtree(path, ignore_errors=True)


# ---- databases and jobs ---------------------------------------------------------------------------
def create_pg_database(cleanup: Cleanup, suffix: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from common.db import migrate, normalize_url

    name = f"gf_bench_{os.getpid()}_{suffix}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(normalize_url(cleanup.admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            cleanup.databases.append(name)
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = make_url(normalize_url(cleanup.admin_url)).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    return url


def create_sqlite_database(cleanup: Cleanup) -> str:
    from common.db import migrate

    directory = tempfile.mkdtemp(prefix="gf_bench_")
    cleanup.tempdirs.append(directory)
    url = f"sqlite:///{directory}/bench.db"
    migrate(url)
    return url


def versions(pg_version: str | None) -> str:
    import sqlite3

    import sqlalchemy

    parts = [f"Python {platform.python_version()}", f"SQLAlchemy {sqlalchemy.__version__}",
             f"SQLite {sqlite3.sqlite_version}"]
    with contextlib.suppress(ImportError):
        import psycopg

        parts.append(f"psycopg {psycopg.__version__}")
    if pg_version:
        parts.append(f"PostgreSQL {pg_version}")
    with contextlib.suppress(ImportError):
        import uvicorn

        extras = [name for name in ("uvloop", "httptools") if _importable(name)]
        parts.append(f"uvicorn {uvicorn.__version__}" + (f" ({'+'.join(extras)})" if extras else ""))
    with contextlib.suppress(ImportError):
        import httpx

        parts.append(f"httpx {httpx.__version__}")
    return ", ".join(parts)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pg_server_version(admin_url: str) -> str | None:
    return pg_setting(admin_url, "server_version").split()[0]


def pg_setting(admin_url: str, name: str) -> str:
    from sqlalchemy import create_engine, text

    from common.db import normalize_url

    engine = create_engine(normalize_url(admin_url))
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT current_setting(:name)"), {"name": name}).scalar_one()
    finally:
        engine.dispose()
