"""Start a real API server and real `gridfleet worker` processes for the benchmarks (no test code)."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GRIDFLEET = [sys.executable, "-m", "common.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Fleet:
    """`gridfleet serve` on a SQLite file under `home`, plus worker processes, each in its own home."""

    def __init__(self, home: Path, **settings: str):
        self.home = home
        self.token = "gf_bench_" + secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{home / 'gridfleet.db'}",
            "GRIDFLEET_ADMIN_TOKEN": self.token, "GRIDFLEET_TOKEN": self.token, "GRIDFLEET_SERVER_URL": self.url,
            **{f"GRIDFLEET_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.procs: list[subprocess.Popen] = []
        self.server: subprocess.Popen | None = None

    def __enter__(self) -> "Fleet":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "server.log", "wb")
        self.server = subprocess.Popen([*GRIDFLEET, "serve", "--port", str(self.port), "--log-level", "warning"],
                                       cwd=ROOT, env=self.env, stdout=log, stderr=log)
        self.procs.append(self.server)
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=30)
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
        proc = subprocess.Popen([*GRIDFLEET, "worker", "--name", name, *args], cwd=ROOT,
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
