"""A private Postgres server for tests that stop, restart or crash it: `PgCluster` runs initdb into a temporary
directory, listens on its own free port (TCP on 127.0.0.1 only, trust auth) and is driven with pg_ctl.

Read `PgCluster.start` / `stop` / `restart` / `close`; `url(database)` names a database on it. As root, every
pg_ctl/initdb call runs as the `postgres` OS user (Postgres refuses to run as root) on a directory it owns.
The `pg_cluster` fixture (tests/conftest.py) makes one per test session and removes it at the end.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, text

START_TIMEOUT_S = 60  # pg_ctl -t: a cold start or crash recovery on a loaded 2-core machine
# Durability is not what these tests look at: no fsync keeps a crash restart quick. An immediate stop is
# a crash of Postgres only, not of the machine, so what it wrote is still in the page cache.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'", "unix_socket_directories": "''", "fsync": "off",
    "full_page_writes": "off", "shared_buffers": "'32MB'", "max_connections": "100",
    "logging_collector": "off", "log_min_messages": "warning",
    "max_prepared_transactions": "2",  # a test holds a row lock through a shutdown in a prepared transaction
}


class PgClusterUnavailable(RuntimeError):
    """No Postgres server binaries here (initdb/pg_ctl), or no OS user to run them as."""


def bin_dir() -> Path:
    """Where initdb and pg_ctl live: Debian's versioned folders (newest first), else `pg_config --bindir`,
    else PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                    key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0, reverse=True)
    if debian:
        return debian[0].parent
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found = ""
    if found and (Path(found) / "pg_ctl").exists():
        return Path(found)
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).parent / "initdb").exists():
        return Path(on_path).parent
    raise PgClusterUnavailable("no Postgres server binaries (pg_ctl, initdb) found")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    def __init__(self, root: Path | None = None):
        self.bin = bin_dir()
        self._as_postgres = os.geteuid() == 0
        self.root = Path(root or tempfile.mkdtemp(prefix="gridfleet-pgcluster-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        if self._as_postgres:
            try:
                shutil.chown(self.root, user="postgres", group="postgres")
            except LookupError as exc:
                raise PgClusterUnavailable("running as root, but there is no `postgres` OS user") from exc
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    # ---- driving the server --------------------------------------------------------------------
    def start(self) -> None:
        """Start on a new free port the first time, on the same port afterwards (clients reconnect to it)."""
        if not self.port:
            self.port = _free_port()
            settings = {**SETTINGS, "port": str(self.port)}
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self, mode: str = "fast") -> None:
        """mode: 'smart' (wait for clients), 'fast' (end their sessions) or 'immediate' (a crash: no
        shutdown checkpoint, recovery at the next start)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(START_TIMEOUT_S), "stop")

    def restart(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "-t", str(START_TIMEOUT_S),
                 "restart")

    def running(self) -> bool:
        return subprocess.run(self._cmd("pg_ctl", "-D", str(self.data), "status"), capture_output=True).returncode == 0

    def close(self) -> None:
        """Stop the server if it runs (a crash stop: nothing to keep) and remove its directory."""
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- databases -----------------------------------------------------------------------------
    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def _cmd(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin / program), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self._as_postgres else command

    def _pg(self, program: str, *args: str) -> None:
        done = subprocess.run(self._cmd(program, *args), capture_output=True, text=True, cwd=self.root,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                               f"\n--- server log ---\n{log}")
