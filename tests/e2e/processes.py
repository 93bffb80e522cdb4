"""Real processes for end-to-end tests: `gridfleet serve`, `gridfleet worker` agents (each training in a child
process forked from its warm process), each in its own session/process group so a test can kill an agent *and* its job child
together, and teardown never leaves anything behind. `Fleet` starts and tracks them (the `fleet` fixture
in tests/conftest.py); the API helpers below read what the server says.

The server runs with a short lease (LEASE_SECONDS) and fast heartbeats, so a dead worker's job comes back
within seconds. Every wait polls with a generous deadline (never a fixed sleep), so a loaded 2-core machine
only makes the tests slower, not flaky.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 6.0  # long enough that a worker starved of CPU on a loaded 2-core box keeps its lease
HEARTBEAT_SECONDS = 0.5
BACKOFF_BASE_SECONDS = 0.2
DEADLINE = 90.0  # seconds any one wait may take before the test fails (normally a few)
POLL = 0.1

# ---- processes ---------------------------------------------------------------------------------------
def gridfleet_cmd() -> list[str]:
    script = Path(sys.executable).with_name("gridfleet")
    return [str(script)] if script.exists() else [sys.executable, "-m", "common.cli"]


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process from /proc, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def group_members(pgid: int) -> dict[int, tuple[int, str]]:
    """Live (not zombie) processes of process group `pgid`: pid -> (ppid, command line)."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat and stat[2] == pgid and stat[0] not in ("Z", "X"):
            members[int(entry.name)] = (stat[1], _cmdline(int(entry.name)))
    return members


class Proc:
    """A subprocess in its own session (so its pid is its process group id), output to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path, log_dir: Path):
        self.name = name
        self.args, self.env, self.cwd = args, env, cwd  # to start it again (Fleet.restart_server)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group(self) -> dict[int, tuple[int, str]]:
        return group_members(self.pid)

    def job_children(self) -> list[int]:
        """The agent's job processes: forked by its warm process (named gridfleet-job, worker/warm.py) or
        spawned cold by the agent itself (not the warm process, not multiprocessing's resource tracker)."""
        found = []
        for pid, (ppid, cmd) in self.group().items():
            name = _comm(pid)
            if name == "gridfleet-job" or (ppid == self.pid and "spawn_main" in cmd and name != "gridfleet-warm"):
                found.append(pid)
        return found

    def warm_processes(self) -> list[int]:
        return [pid for pid, (ppid, _) in self.group().items() if ppid == self.pid and _comm(pid) == "gridfleet-warm"]

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def send_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def close(self) -> None:
        # Only a group that is certainly ours: its leader not yet reaped, or members left (a process
        # group id is not reused while the group has members).
        if self.alive() or self.group():
            self.send_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Server:
    url: str
    admin_token: str
    worker_token: str
    proc: Proc
    api: httpx.Client  # /api/v1 with the admin token


class Fleet:
    """Starts and tracks the processes of one test; teardown kills every process group it started."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: list[Proc] = []
        self.clients: list[httpx.Client] = []

    def env(self, **values: str) -> dict[str, str]:
        # Nothing from the caller's gridfleet settings leaks in; cwd is tmp_path, so no .env is read either.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_") and k != "DATABASE_URL"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(
            PYTHONUNBUFFERED="1", HF_HUB_DISABLE_TELEMETRY="1",
            GRIDFLEET_LEASE_SECONDS=str(LEASE_SECONDS), GRIDFLEET_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
            GRIDFLEET_BACKOFF_BASE_SECONDS=str(BACKOFF_BASE_SECONDS),
        )
        env.update(values)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        proc = Proc(name, args, env, cwd or self.tmp, self.logs)
        self.procs.append(proc)
        return proc

    def explain(self) -> str:
        parts = [f"--- {p.name} (pid {p.pid}, exit {p.popen.poll()}; log {p.log_path}) ---\n{p.tail()}"
                 for p in self.procs]
        return "\n".join(parts)

    def assert_clean(self) -> None:
        """No traceback in any server or agent log (a 500, a crashed agent, an unhandled thread error)."""
        for proc in self.procs:
            assert "Traceback" not in proc.tail(100_000), f"traceback in {proc.name}'s log\n{self.explain()}"

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        """Poll `check` until it returns something truthy (returned); fail with every log's tail."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                value = check()
            except (httpx.TransportError, LookupError, OSError) as exc:  # not up yet / not there yet
                value, last_error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                     f" (last error: {last_error!r})\n{self.explain()}")
            time.sleep(POLL)

    # ---- the API server ------------------------------------------------------------------------
    def start_server(self, db_url: str, log_level: str = "warning") -> Server:
        """`gridfleet serve` on `db_url`; log_level "info" writes uvicorn's access log (one line per reply)."""
        from api import tokens
        from common.db import make_engine

        admin_token = "gf_e2e_admin_" + secrets.token_hex(16)
        for _ in range(3):  # a free port can be taken between choosing it and binding it
            port = _free_port()
            env = self.env(DATABASE_URL=db_url, GRIDFLEET_ADMIN_TOKEN=admin_token,
                           GRIDFLEET_HOME=str(self.tmp / "server-home"))
            proc = self.spawn(f"server-{port}", [*gridfleet_cmd(), "serve", "--host", "127.0.0.1", "--port",
                                                 str(port), "--log-level", log_level], env)
            url = f"http://127.0.0.1:{port}"
            api = httpx.Client(base_url=url + "/api/v1", timeout=30.0,
                               headers={"Authorization": f"Bearer {admin_token}"})
            self.clients.append(api)

            def ours() -> bool:  # our token proves it is our server, not another one on that port
                if not proc.alive():
                    return True
                return api.get("/workers").status_code == 200

            self.wait_for(ours, "the API server to answer")
            if proc.alive():
                break
        else:
            raise AssertionError(f"the API server did not start\n{self.explain()}")
        engine = make_engine(db_url)
        try:
            _, worker_token = tokens.create_token(engine, "worker", "e2e workers")
        finally:
            engine.dispose()
        return Server(url=url, admin_token=admin_token, worker_token=worker_token, proc=proc, api=api)

    def restart_server(self, server: Server) -> Server:
        """Start a server the test killed again, on the same port and database, with the same tokens."""
        old = server.proc
        assert not old.alive(), f"{old.name} is still running"
        proc = self.spawn(f"{old.name}-again", old.args, old.env, old.cwd)
        self.wait_for(lambda: not proc.alive() or server.api.get("/workers").status_code == 200,
                      "the API server to answer again")
        assert proc.alive(), f"the API server did not start again\n{self.explain()}"
        return Server(url=server.url, admin_token=server.admin_token, worker_token=server.worker_token,
                      proc=proc, api=server.api)

    def start_worker(self, server: Server, name: str, grace: float = 30.0) -> Proc:
        env = self.env(GRIDFLEET_HOME=str(self.tmp / f"{name}-home"), GRIDFLEET_TOKEN=server.worker_token)
        return self.spawn(name, [*gridfleet_cmd(), "worker", "--server", server.url, "--name", name,
                                 "--grace", str(grace)], env)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for proc in reversed(self.procs):  # workers before the server
            proc.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- API helpers -------------------------------------------------------------------------------------
def ok(response: httpx.Response) -> Any:
    assert response.status_code < 400, f"{response.request.method} {response.request.url}: " \
                                       f"{response.status_code} {response.text}"
    return response.json()


def submit(api: httpx.Client, name: str, config: dict[str, Any], **spec: Any) -> int:
    """Post a one-job sleep grid; returns the job's id."""
    ok(api.post("/grids", json={"name": name, "trainer": "sleep", "config": config, **spec}))
    results = ok(api.get(f"/grids/{name}/results"))["results"]
    assert len(results) == 1, results
    return results[0]["job_id"]


def job(api: httpx.Client, job_id: int) -> dict[str, Any]:
    return ok(api.get(f"/jobs/{job_id}"))


def worker_names(api: httpx.Client) -> dict[str, str]:
    return {w["id"]: w["name"] for w in ok(api.get("/workers"))["workers"]}


def attempt_steps(api: httpx.Client, job_id: int, attempt_id: str) -> list[int]:
    metrics = ok(api.get(f"/jobs/{job_id}/metrics"))["metrics"]
    return sorted(m["step"] for m in metrics if m["attempt_id"] == attempt_id)


def running_with(api: httpx.Client, job_id: int, min_step: int, checkpointed: bool) -> dict[str, Any] | None:
    """The job when it runs and has reached `min_step` (by checkpoint or by reported step), else None."""
    detail = job(api, job_id)
    assert detail["state"] in ("queued", "running"), f"job ended early: {detail}"
    step = (detail["checkpoint"] or {}).get("step") if checkpointed else detail["step"]
    return detail if detail["state"] == "running" and (step or 0) >= min_step else None
