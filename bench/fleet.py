"""Start a real API server and real `gridfleet worker` processes for the benchmarks (no test code).

`Fleet(home, root=...)` runs the code of another copy of the project (`export_rev` makes one from a git
commit), so a bench can measure the old behaviour beside the new one in one run.
"""
from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GRIDFLEET = [sys.executable, "-m", "common.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_rev(rev: str, dest: Path) -> Path:
    """The project's files at git commit `rev`, written under `dest` (git state is not touched)."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def job_children(pid: int) -> list[int]:
    """The job processes of agent `pid`, from /proc: spawned by it cold, or forked by its warm process
    (worker/warm.py names those gridfleet-warm and gridfleet-job); not multiprocessing's resource tracker."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            procs[int(entry.name)] = (int(fields[1]), cmdline, comm)
    warm = {p for p, (ppid, _, comm) in procs.items() if ppid == pid and comm == "gridfleet-warm"}
    return [p for p, (ppid, cmdline, comm) in procs.items()
            if (ppid in warm and comm == "gridfleet-job")
            or (ppid == pid and b"spawn_main" in cmdline and comm != "gridfleet-warm")]


class Fleet:
    """`gridfleet serve` on a SQLite file under `home`, plus worker processes, each in its own home;
    all run the code under `root` (default: this checkout)."""

    def __init__(self, home: Path, root: Path = ROOT, **settings: str):
        self.home = home
        self.root = root
        self.token = "gf_bench_" + secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "PYTHONPATH": str(root), "DATABASE_URL": f"sqlite:///{home / 'gridfleet.db'}",
            "GRIDFLEET_ADMIN_TOKEN": self.token, "GRIDFLEET_TOKEN": self.token, "GRIDFLEET_SERVER_URL": self.url,
            **{f"GRIDFLEET_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.procs: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None

    def __enter__(self) -> "Fleet":
        self.home.mkdir(parents=True, exist_ok=True)
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=30)
        return self.start_server()

    def kill_server(self) -> None:
        """SIGKILL the API server (an outage); `start_server` brings it back on the same port and database."""
        self.server.kill()
        self.server.wait()

    def start_server(self) -> "Fleet":
        log = open(self.home / "server.log", "ab")
        self.server = subprocess.Popen([*GRIDFLEET, "serve", "--port", str(self.port), "--log-level", "warning"],
                                       cwd=self.root, env=self.env, stdout=log, stderr=log)
        self.procs.append(self.server)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not come up; see {self.home / 'server.log'}")

    def start_worker(self, name: str, *args: str) -> subprocess.Popen:
        home = self.home / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(home / "worker.log", "wb")
        proc = subprocess.Popen([*GRIDFLEET, "worker", "--name", name, *args], cwd=self.root,
                                env={**self.env, "GRIDFLEET_HOME": str(home)}, stdout=log, stderr=log,
                                start_new_session=True)  # its own process group: kill -9 takes the job too
        self.procs.append(proc)
        return proc

    @staticmethod
    def kill_hard(proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def get(self, path: str) -> dict:
        reply = self.http.get(path)
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: dict | None = None) -> dict:
        reply = self.http.post(path, json=body)
        reply.raise_for_status()
        return reply.json()

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.http.close()
