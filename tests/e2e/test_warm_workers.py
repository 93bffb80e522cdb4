"""Warm starts end to end: a real `gridfleet worker` forks its jobs from its warm process (worker/warm.py).
What must stay true of a job child: a segfault ends only its job, and kill -9 of the agent takes the job
(and the warm process) with it. The Launcher-level tests are in tests/integration/test_warm_starts.py.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.e2e.processes import _proc_stat, job, running_with, submit

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open") or not Path("/proc/self/stat").exists(),
                                reason="warm starts need Linux pidfds and /proc")


def _gone(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is None or stat[0] in "ZX"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill9_of_the_agent_takes_its_warm_job_child_and_warm_process(db_url, fleet):
    server = fleet.start_server(db_url)
    job_id = submit(server.api, "e2e-warm-orphan", {"seconds": 120, "steps": 2})  # silent for a minute
    agent = fleet.start_worker(server, "w1")
    fleet.wait_for(lambda: running_with(server.api, job_id, 0, checkpointed=False) and agent.job_children(),
                   "the job to run")
    [child] = agent.job_children()
    [warm] = agent.warm_processes()
    assert _proc_stat(child)[1] == warm, fleet.explain()  # forked from the warm process, not spawned
    os.kill(agent.pid, signal.SIGKILL)  # the agent only, not its process group
    fleet.wait_for(lambda: _gone(child) and _gone(warm), "the job child and the warm process to die with the agent",
                   timeout=15)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_segfaulting_warm_job_fails_alone_and_the_next_job_runs(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    crash = submit(api, "e2e-segfault", {"seconds": 0.0, "steps": 3, "segfault_at_step": 1}, max_attempts=1)
    worker = fleet.start_worker(server, "w1")
    done = fleet.wait_for(lambda: (d := job(api, crash))["state"] not in ("queued", "running") and d,
                          "the crashing job to end")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "failed" and "exited with code -11" in done["last_error"], context
    [warm] = worker.warm_processes()

    after = submit(api, "e2e-after-segfault", {"seconds": 0.0, "steps": 2})
    done = fleet.wait_for(lambda: (d := job(api, after))["state"] not in ("queued", "running") and d,
                          "the next job to finish")
    assert done["state"] == "succeeded" and done["result"] == {"loss": 0.5, "steps": 2}, fleet.explain()
    assert worker.alive() and worker.warm_processes() == [warm], fleet.explain()  # same agent, same warm process
    fleet.assert_clean()
