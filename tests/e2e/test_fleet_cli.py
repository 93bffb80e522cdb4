"""`gridfleet fleet` as users run it: a real process that starts a one-machine Ray cluster (`--ray-address
local`), runs worker actors against `gridfleet serve`, answers `gridfleet fleet status`, and drains on SIGTERM."""
from __future__ import annotations

import signal
import subprocess

import pytest

pytest.importorskip("ray")

from tests.e2e.processes import DEADLINE, Fleet, gridfleet_cmd, job, ok  # noqa: E402


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_fleet_command_runs_jobs_reports_status_and_drains_on_sigterm(db_url, fleet: Fleet):
    server = fleet.start_server(db_url)
    ok(server.api.post("/grids", json={"name": "cli-fleet", "trainer": "sleep", "config": {"seconds": 0.5},
                                       "axes": {"steps": [2, 3]}}))
    ids = [row["job_id"] for row in ok(server.api.get("/grids/cli-fleet/results"))["results"]]
    env = fleet.env(GRIDFLEET_TOKEN=server.worker_token, GRIDFLEET_HOME=str(fleet.tmp / "fleet-home"),
                    RAY_AUTH_MODE="disabled")
    proc = fleet.spawn("fleet", [*gridfleet_cmd(), "fleet", "--ray-address", "local", "--num-cpus", "2",
                                 "--server", server.url, "--workers", "2", "--gpus-per-worker", "0",
                                 "--grace", "10"], env)
    fleet.wait_for(lambda: all(job(server.api, i)["state"] == "succeeded" for i in ids),
                   "the fleet's actors to finish the grid")

    status = subprocess.run([*gridfleet_cmd(), "fleet", "status", "--ray-address", "auto"], env=env, cwd=fleet.tmp,
                            capture_output=True, text=True, timeout=DEADLINE)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "fleet-0" in status.stdout and "fleet-1" in status.stdout, status.stdout
    workers = {w["name"] for w in ok(server.api.get("/workers"))["workers"]}
    assert {"fleet-0", "fleet-1"} <= workers

    proc.send(signal.SIGTERM)
    assert proc.wait(DEADLINE) == 0, fleet.explain()
    assert "drained" in proc.tail(), proc.tail()
