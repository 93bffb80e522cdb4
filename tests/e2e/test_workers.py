"""End to end with real processes: `gridfleet serve`, `gridfleet worker` agents (each training in a spawned
child process), `gridfleet run`, and real signals (kill -9, SIGTERM, Ctrl-C). The process helpers are in
tests/e2e/processes.py; tests/e2e/test_api_server.py has its own.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.processes import (
    BACKOFF_BASE_SECONDS,
    DEADLINE,
    _proc_stat,
    attempt_steps,
    gridfleet_cmd,
    job,
    ok,
    running_with,
    submit,
    worker_names,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
                                reason="needs Linux /proc and POSIX process groups")


# ---- tests: API server + workers ---------------------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_kill9_worker_mid_job_resumes_on_other_worker_and_completes_once(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    steps = 30
    job_id = submit(api, "e2e-kill9", {"seconds": 4.5, "steps": steps, "checkpoint_every": 1})
    workers = {name: fleet.start_worker(server, name) for name in ("w1", "w2")}

    before = fleet.wait_for(lambda: running_with(api, job_id, 3, checkpointed=True),
                            "the job to run and checkpoint step 3")
    holder_name = worker_names(api)[before["worker_id"]]
    holder = workers[holder_name]
    other = workers["w2" if holder_name == "w1" else "w1"]
    children = holder.job_children()
    assert len(children) == 1, f"expected one job child of {holder_name}: {holder.group()}"

    killed_at = time.time()
    holder.send_group(signal.SIGKILL)  # the agent, its job child and the resource tracker, all at once
    fleet.wait_for(lambda: not holder.group(), "every process of the killed worker to be gone")
    assert holder.wait(10) == -signal.SIGKILL
    assert all(_proc_stat(pid) is None or _proc_stat(pid)[0] in "ZX" for pid in children)
    killed_at_checkpoint = before["checkpoint"]["step"]

    done = fleet.wait_for(lambda: (d := job(api, job_id))["state"] not in ("queued", "running") and d,
                          "the job to be re-claimed after the lease expired and to finish")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded", context
    assert done["result"] == {"loss": 1.0 / steps, "steps": steps}, context
    assert (done["attempts"], done["losses"], done["errors"], done["preemptions"]) == (2, 1, 0, 0), context
    first, second = done["attempt_history"]
    assert (first["outcome"], second["outcome"]) == ("lost", "succeeded"), context
    assert first["worker_id"] == before["worker_id"] and second["worker_id"] != before["worker_id"], context
    # Lost only once its lease ran out after the kill; re-claimed only after that.
    assert killed_at < first["ended_at"] <= second["started_at"], context
    assert worker_names(api)[second["worker_id"]] == ("w2" if holder_name == "w1" else "w1")
    assert other.alive(), context

    # The second attempt resumed from the checkpoint: its first step is after the one checkpointed
    # before the kill, and it ran every later step exactly once.
    resumed = attempt_steps(api, job_id, second["id"])
    assert resumed and resumed[0] > 1 and resumed[0] >= killed_at_checkpoint + 1, (resumed, context)
    assert resumed == list(range(resumed[0], steps + 1)), (resumed, context)
    kinds = [e["kind"] for e in ok(api.get(f"/jobs/{job_id}/events"))["events"]]
    assert kinds.count("lost") == 1 and kinds.count("succeeded") == 1, kinds

    other.send(signal.SIGTERM)  # an idle agent stops cleanly
    assert other.wait(DEADLINE) == 0, fleet.explain()
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill9_of_the_agent_alone_takes_its_job_process_with_it(db_url, fleet):
    """No orphan keeps training a job whose lease will pass to another worker."""
    server = fleet.start_server(db_url)
    # Two 60-second steps: the job writes nothing to its (dead) agent for a minute.
    job_id = submit(server.api, "e2e-orphan", {"seconds": 120, "steps": 2})
    agent = fleet.start_worker(server, "w1")
    fleet.wait_for(lambda: running_with(server.api, job_id, 0, checkpointed=False) and agent.job_children(),
                   "the job to run")
    children = agent.job_children()
    assert len(children) == 1, agent.group()
    os.kill(agent.pid, signal.SIGKILL)  # the agent only, not its process group
    fleet.wait_for(lambda: all(_proc_stat(pid) is None or _proc_stat(pid)[0] in "ZX" for pid in children),
                   "the job process to die with its agent", timeout=15)


@pytest.mark.parametrize(
    "db_url, target",
    [
        ("postgres", "agent"),  # `kill PID`: the agent asks its job child to checkpoint and stop
        ("sqlite", "process group"),  # systemd / Ctrl-C style: the agent and its job child both get it
        ("sqlite", "job child"),  # only the training process: the agent survives and releases the job
    ],
    indirect=["db_url"],
)
def test_sigterm_preempts_with_checkpoint_and_the_job_resumes(db_url, target, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    steps = 40
    # The trainer checkpoints only when asked to stop: the resume below can only come from that checkpoint.
    job_id = submit(api, "e2e-sigterm", {"seconds": 4.0, "steps": steps, "checkpoint_every": 10_000})
    workers = {name: fleet.start_worker(server, name) for name in ("w1", "w2")}

    before = fleet.wait_for(lambda: running_with(api, job_id, 3, checkpointed=False),
                            "the job to run and report step 3")
    holder_name = worker_names(api)[before["worker_id"]]
    holder = workers[holder_name]
    assert before["checkpoint"] is None
    children = holder.job_children()
    assert len(children) == 1, f"expected one job child of {holder_name}: {holder.group()}"

    if target == "agent":
        holder.send(signal.SIGTERM)
    elif target == "process group":
        holder.send_group(signal.SIGTERM)
    else:
        os.kill(children[0], signal.SIGTERM)
    if target == "job child":
        fleet.wait_for(lambda: job(api, job_id)["attempt_history"][0]["outcome"] != "running",
                       "the first attempt to end")
        assert holder.alive(), "the agent must survive its job child's SIGTERM\n" + fleet.explain()
    else:
        fleet.wait_for(lambda: not holder.alive(), "the SIGTERMed worker to exit")
        assert holder.popen.returncode == 0, fleet.explain()

    released = job(api, job_id)
    context = f"\njob: {released}\n{fleet.explain()}"
    first = released["attempt_history"][0]
    assert first["outcome"] == "preempted" and first["error"] is None, context
    assert (released["errors"], released["preemptions"], released["losses"]) == (0, 1, 0), context
    assert released["result"] is None, context
    saved = released["checkpoint"]["step"]
    assert 3 <= saved < steps, context
    assert max(attempt_steps(api, job_id, first["id"])) == saved, context

    done = fleet.wait_for(lambda: (d := job(api, job_id))["state"] not in ("queued", "running") and d,
                          "a worker to resume and finish the job")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded", context
    assert done["result"] == {"loss": 1.0 / steps, "steps": steps}, context
    assert (done["attempts"], done["errors"], done["preemptions"], done["losses"]) == (2, 0, 1, 0), context
    assert [a["outcome"] for a in done["attempt_history"]] == ["preempted", "succeeded"], context
    second = done["attempt_history"][1]
    if target != "job child":
        assert worker_names(api)[second["worker_id"]] != holder_name, context
    resumed = attempt_steps(api, job_id, second["id"])
    assert resumed == list(range(saved + 1, steps + 1)), (resumed, context)
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cancel_running_job_stops_it_within_a_heartbeat(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    steps = 300
    job_id = submit(api, "e2e-cancel", {"seconds": 60.0, "steps": steps, "checkpoint_every": 1})
    worker = fleet.start_worker(server, "w1")
    fleet.wait_for(lambda: running_with(api, job_id, 2, checkpointed=True), "the job to run and checkpoint")

    asked = time.monotonic()
    assert ok(api.post(f"/jobs/{job_id}/cancel"))["state"] == "cancel_requested"
    done = fleet.wait_for(lambda: (d := job(api, job_id))["state"] != "running" and d, "the job to stop")
    took = time.monotonic() - asked
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "cancelled", context
    # One heartbeat (0.5 s) carries the cancel; then one 0.2 s step and a checkpoint. Loose for loaded CI.
    assert took < 10.0, f"cancel took {took:.1f} s" + context
    assert [a["outcome"] for a in done["attempt_history"]] == ["cancelled"], context
    assert done["result"] is None and done["step"] < steps and done["errors"] == 0, context

    # The agent survives a cancelled job and goes back to idle.
    def idle() -> bool:
        return [w["state"] for w in ok(api.get("/workers"))["workers"]] == ["idle"]

    fleet.wait_for(idle, "the worker to be idle again")
    assert worker.alive(), context
    assert job(api, job_id)["attempts"] == 1
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_trainer_error_is_retried_with_backoff_then_failed_with_traceback(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    job_id = submit(api, "e2e-fail", {"seconds": 0.2, "steps": 2, "fail_at_step": 0}, max_attempts=2)
    worker = fleet.start_worker(server, "w1")

    done = fleet.wait_for(lambda: (d := job(api, job_id))["state"] not in ("queued", "running") and d,
                          "the job to fail twice")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "failed", context
    assert (done["attempts"], done["errors"], done["losses"], done["preemptions"]) == (2, 2, 0, 0), context
    first, second = done["attempt_history"]
    assert (first["outcome"], second["outcome"]) == ("error", "error"), context
    assert "RuntimeError: sleep trainer asked to fail at step 0" in done["last_error"], context
    # The retry waited out the backoff (base 0.2 s for the first error).
    assert second["started_at"] - first["ended_at"] >= BACKOFF_BASE_SECONDS - 0.01, context

    events = ok(api.get(f"/jobs/{job_id}/events"))["events"]
    text = "\n".join(e["message"] for e in events)
    assert "Traceback" in text and "RuntimeError" in text, events
    errors = [e for e in events if e["kind"] == "error"]
    assert len(errors) == 2, events
    assert "retry not before" in errors[0]["message"] and "job is now queued" in errors[0]["message"], errors
    assert "job is now failed" in errors[1]["message"] and "Traceback" in errors[1]["message"], errors
    assert worker.alive(), "a crashing trainer must not kill the agent" + context
    fleet.assert_clean()  # the trainer's traceback is in the job's events, not in the agent's log


# ---- test: embedded `gridfleet run`, Ctrl-C, run again -------------------------------------------------
LOCAL_GRID = """\
name: e2e-local
trainer: sleep
config:
  steps: 40
  checkpoint_every: 1
axes:
  seconds: [0.4, 6.0]   # job 1 finishes quickly; job 2 (0.15 s a step) is interrupted
"""


def test_run_interrupted_with_ctrl_c_then_rerun_resumes(fleet, tmp_path):
    from common.db import make_engine
    from scheduler.reports import grid_results, job_detail

    home = tmp_path / "home"
    db_url = f"sqlite:///{home / 'gridfleet.db'}"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(LOCAL_GRID)
    env = fleet.env(GRIDFLEET_HOME=str(home), DATABASE_URL=db_url, COLUMNS="120")
    command = [*gridfleet_cmd(), "run", str(grid_file.name), "--workers", "1"]
    engine = make_engine(db_url)
    try:
        def rows() -> list[dict[str, Any]]:
            try:
                return grid_results(engine, "e2e-local")
            except Exception:  # noqa: BLE001 - the database or grid is not there yet
                return []

        def second_job_midway():
            found = rows()
            if len(found) != 2 or found[0]["state"] != "succeeded" or found[1]["state"] != "running":
                return None
            return job_detail(engine, found[1]["job_id"]) if (found[1]["step"] or 0) >= 3 else None

        first_run = fleet.spawn("run-1", command, env)
        running = fleet.wait_for(second_job_midway, "job 1 to finish and job 2 to be midway")
        assert (running["checkpoint"] or {}).get("step", 0) >= 1, running
        first_run.send_group(signal.SIGINT)  # Ctrl-C: the whole foreground process group gets SIGINT
        assert first_run.wait(DEADLINE) == 3, fleet.explain()  # 3: not finished, run again to continue
        assert "run the same command again" in first_run.tail(200), fleet.explain()
        fleet.wait_for(lambda: not first_run.group(), "every process of the first run to exit")

        fast, slow = rows()
        interrupted = job_detail(engine, slow["job_id"])
        context = f"\njob: {interrupted}\n{fleet.explain()}"
        assert fast["state"] == "succeeded" and fast["attempts"] == 1, fast
        assert interrupted["state"] == "queued", context
        assert interrupted["checkpoint"]["step"] > 0, context
        assert [a["outcome"] for a in interrupted["attempt_history"]] == ["preempted"], context
        assert interrupted["errors"] == 0 and interrupted["losses"] == 0, context
        saved = interrupted["checkpoint"]["step"]

        second_run = fleet.spawn("run-2", command, env)
        assert second_run.wait(DEADLINE) == 0, fleet.explain()
        assert "0 new configs, 2 already stored" in second_run.tail(200), fleet.explain()
        fast, slow = rows()
        assert fast["state"] == "succeeded" and fast["attempts"] == 1, fast  # not retrained
        finished = job_detail(engine, slow["job_id"])
        context = f"\njob: {finished}\n{fleet.explain()}"
        assert finished["state"] == "succeeded" and finished["attempts"] == 2, context
        assert [a["outcome"] for a in finished["attempt_history"]] == ["preempted", "succeeded"], context
        assert finished["result"] == {"loss": 1.0 / 40, "steps": 40}, context
        with engine.connect() as conn:
            from sqlalchemy import text

            resumed_from = conn.execute(
                text("SELECT MIN(step) FROM metrics WHERE attempt_id = :a"),
                {"a": finished["attempt_history"][1]["id"]},
            ).scalar()
        assert resumed_from == saved + 1, (resumed_from, saved)
        out = home / "runs" / "e2e-local"
        assert (out / "results.csv").is_file()
        agent_log = (out / "worker-0.log").read_text()
        assert "job 2 finished: preempted -> queued" in agent_log and "Traceback" not in agent_log, agent_log
        fleet.assert_clean()
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_max_run_time_checkpoints_and_releases_the_job_before_the_budget_ends(db_url, fleet):
    """A rented studio's free hours: the worker preempts its own job `--grace` before `--max-run-time`, claims
    nothing more, and exits; another worker resumes the job from that checkpoint."""
    server = fleet.start_server(db_url)
    api = server.api
    steps = 40
    # Checkpoints only when asked to stop: the resume below can only come from the budget's checkpoint.
    job_id = submit(api, "e2e-budget", {"seconds": 20.0, "steps": steps, "checkpoint_every": 10_000})
    # The grace period covers the stop checkpoint's first `import torch` (seconds on a loaded 2-core machine).
    budget, grace = 35.0, 22.0
    env = fleet.env(GRIDFLEET_HOME=str(fleet.tmp / "short-home"), GRIDFLEET_TOKEN=server.worker_token)
    short = fleet.spawn("short", [*gridfleet_cmd(), "worker", "--server", server.url, "--name", "short",
                                  "--max-run-time", str(budget), "--grace", str(grace),
                                  "--min-job-time", str(grace + 1)], env)
    fleet.wait_for(lambda: running_with(api, job_id, 1, checkpointed=False), "the job to run on the short worker")
    fleet.wait_for(lambda: not short.alive(), "the worker to reach --max-run-time and exit", timeout=budget + DEADLINE)
    assert short.popen.returncode == 0, fleet.explain()

    released = job(api, job_id)
    context = f"\njob: {released}\n{fleet.explain()}"
    (first,) = released["attempt_history"]
    assert first["outcome"] == "preempted" and first["error"] is None, context
    assert released["state"] == "queued" and released["preemptions"] == 1 and released["errors"] == 0, context
    registered = next(w["registered_at"] for w in ok(api.get("/workers"))["workers"] if w["name"] == "short")
    assert first["ended_at"] - registered < budget, context  # released within its budget, not killed after it
    saved = released["checkpoint"]["step"]
    assert 1 <= saved < steps and max(attempt_steps(api, job_id, first["id"])) == saved, context
    assert "not claiming more" in short.tail(200), context

    fleet.start_worker(server, "w2")
    done = fleet.wait_for(lambda: (d := job(api, job_id))["state"] not in ("queued", "running") and d,
                          "the second worker to resume and finish the job")
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded" and done["result"] == {"loss": 1.0 / steps, "steps": steps}, context
    assert [a["outcome"] for a in done["attempt_history"]] == ["preempted", "succeeded"], context
    assert attempt_steps(api, job_id, done["attempt_history"][1]["id"]) == list(range(saved + 1, steps + 1)), context
    fleet.assert_clean()
