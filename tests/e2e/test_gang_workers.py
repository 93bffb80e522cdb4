"""Gangs end to end: real `gridfleet worker` agents claim gangs of noop jobs and train each gang in one child
forked from their warm process (worker/gang_run.py). SIGTERM mid-gang checkpoints every member and releases
it as preempted, and another worker finishes each member exactly once from its own checkpoint; a gang child
that segfaults ends only its members; kill -9 of the agent takes the gang's child with it. The in-process
cases (fused equals solo, cancel, NaN, a refused member) are in tests/integration/test_gang_runner.py; the
last test here is `gridfleet run --gang`'s local workers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.processes import _proc_stat, attempt_steps, gridfleet_cmd, job, ok

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open") or not Path("/proc/self/stat").exists(),
                                reason="warm starts need Linux pidfds and /proc")


def _gang_grid(api, name: str, n: int, config: dict, **spec) -> list[int]:
    ok(api.post("/grids", json={"name": name, "trainer": "noop", "config": {"fuse_group": "g", **config},
                                "axes": {"value": [float(i + 1) for i in range(n)]}, **spec}))
    return sorted(r["job_id"] for r in ok(api.get(f"/grids/{name}/results"))["results"])


def _worker(fleet, server, name: str, gang: int = 8):
    env = fleet.env(GRIDFLEET_HOME=str(fleet.tmp / f"{name}-home"), GRIDFLEET_TOKEN=server.worker_token)
    return fleet.spawn(name, [*gridfleet_cmd(), "worker", "--server", server.url, "--name", name, "--grace", "30",
                              "--trainers", "noop", "--gang", str(gang)], env)


def _gone(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is None or stat[0] in "ZX"


def _all(api, ids, check):
    details = [job(api, i) for i in ids]
    return details if all(check(d) for d in details) else None


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_sigterm_mid_gang_then_another_worker_finishes_every_member_once_from_its_checkpoint(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    ids = _gang_grid(api, "e2e-gang-term", 4, {"steps": 40, "seconds": 6.0})  # 0.15 s a step
    w1 = _worker(fleet, server, "w1")
    fleet.wait_for(lambda: _all(api, ids, lambda d: d["state"] == "running" and (d["checkpoint"] or {}).get(
        "step", 0) >= 3), "the gang to train and checkpoint")
    [child] = fleet.wait_for(w1.job_children, "the gang's child")  # one child for the four
    [warm] = w1.warm_processes()
    assert _proc_stat(child)[1] == warm, fleet.explain()  # forked warm
    w1.send(signal.SIGTERM)
    assert w1.wait(60) == 0, fleet.explain()
    released = _all(api, ids, lambda d: d["state"] == "queued")
    assert released, fleet.explain()
    resumed_from = {}
    for d in released:
        assert [a["outcome"] for a in d["attempt_history"]] == ["preempted"], d
        resumed_from[d["id"]] = d["checkpoint"]["step"]
        assert 3 <= resumed_from[d["id"]] < 40, d

    w2 = _worker(fleet, server, "w2")
    done = fleet.wait_for(lambda: _all(api, ids, lambda d: d["state"] == "succeeded"), "every member to finish")
    for i, d in enumerate(done):
        outcomes = [a["outcome"] for a in d["attempt_history"]]
        assert outcomes == ["preempted", "succeeded"], d  # finished exactly once
        assert d["result"] == {"loss": (i + 1) / 40, "steps": 40}, d  # noop's solo result
        second = d["attempt_history"][1]["id"]
        steps = attempt_steps(api, d["id"], second)
        assert steps == list(range(resumed_from[d["id"]] + 1, 41)), (d["id"], steps)  # from its own checkpoint
    assert w2.alive()
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_segfaulting_gang_ends_only_its_members_and_kill9_of_the_agent_takes_the_gang_child(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    crash = _gang_grid(api, "e2e-gang-segv", 3, {"steps": 20, "seconds": 2.0, "segfault_at_step": 4},
                       max_attempts=1)
    agent = _worker(fleet, server, "w1")
    failed = fleet.wait_for(lambda: _all(api, crash, lambda d: d["state"] == "failed"), "the crashed gang to fail")
    for d in failed:
        assert "exited with code -11" in d["last_error"], d
        assert len(d["attempt_history"]) == 1, d
    assert agent.alive(), fleet.explain()
    [warm] = agent.warm_processes()

    ids = _gang_grid(api, "e2e-gang-orphan", 3, {"steps": 600, "seconds": 120.0})
    fleet.wait_for(lambda: _all(api, ids, lambda d: d["state"] == "running" and (d["step"] or 0) >= 1),
                   "the next gang to train")
    [child] = agent.job_children()
    assert _proc_stat(child)[1] == warm, fleet.explain()  # the same warm process forked it
    os.kill(agent.pid, signal.SIGKILL)  # the agent only, not its process group
    fleet.wait_for(lambda: _gone(child) and _gone(warm), "the gang child and the warm process to die with the agent",
                   timeout=15)


def test_gridfleet_run_gang_trains_its_grid_in_gangs(fleet):
    grid = fleet.tmp / "grid.json"
    config = {"fuse_group": "g", "steps": 5, "seconds": 0.5, "checkpoint_every": 100}
    grid.write_text(json.dumps({"name": "local-gang", "trainer": "noop", "config": config,
                                "axes": {"value": [1.0, 2.0, 3.0, 4.0, 5.0]}}))
    env = fleet.env(GRIDFLEET_HOME=str(fleet.tmp / ".gridfleet"), COLUMNS="100")
    done = subprocess.run([*gridfleet_cmd(), "run", str(grid), "--workers", "1", "--gang", "3"], env=env,
                          cwd=fleet.tmp, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded: 5" in done.stdout, done.stdout
    log = (fleet.tmp / ".gridfleet" / "runs" / "local-gang" / "worker-0.log").read_text()
    assert log.count("gang of 3 noop jobs") == 1 and log.count("gang of 2 noop jobs") == 1, log  # K = 3, then 2
