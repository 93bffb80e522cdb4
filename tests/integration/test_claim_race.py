"""Claim races between real OS processes, on SQLite and on Postgres (the `db_url` fixture).

1. 16 worker processes, released together, race to claim 500 noop jobs with a long lease: every job is
   claimed exactly once, by one attempt, and succeeds.
2. Lease expiry: process A claims with a short lease, heartbeats, and is killed with SIGKILL; process B
   claims the job once the lease has expired; A's attempt id is refused (ok False, stop True) before and
   after B finishes, and the job completes exactly once.

Children are started with the `spawn` context (fresh interpreters, no inherited engines or sockets).
Waits are bounded by generous deadlines, never by tight sleeps: the machine may have 2 busy cores.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
import traceback
from collections import Counter

import pytest
from sqlalchemy import func, select

from common import schema as t
from common.db import make_engine
from scheduler import reports
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue

N_WORKERS = 16
N_JOBS = 500
LONG_LEASE = 600.0  # nothing expires during the race
SHORT_LEASE = 1.5
START_TIMEOUT = 120.0  # spawning 16 interpreters on 2 busy cores can take a while
RUN_TIMEOUT = 180.0

SPAWN = mp.get_context("spawn")


# ---- child processes (module level, so `spawn` can import them) --------------------------------------
def _race_worker(db_url: str, name: str, barrier, results) -> None:
    """Claim until None, finishing each job as succeeded; send back one message with everything."""
    claims: list[tuple[int, str]] = []
    finishes: list[tuple[int, bool, str | None]] = []
    try:
        engine = make_engine(db_url)
        q = Queue(engine, RetryPolicy(lease_seconds=LONG_LEASE))
        with engine.connect() as conn:  # open a connection before the start line, not in the race
            conn.exec_driver_sql("SELECT 1")
        barrier.wait(timeout=START_TIMEOUT)
        while (job := q.claim(name)) is not None:
            claims.append((job.id, job.attempt_id))
            reply = q.finish(job.id, job.attempt_id, "succeeded", result={"loss": job.config.get("value")},
                             worker_id=name)
            finishes.append((job.id, reply.ok, reply.state))
        engine.dispose()
        results.put({"name": name, "claims": claims, "finishes": finishes, "error": None})
    except BaseException:  # noqa: BLE001 - report everything to the test process
        results.put({"name": name, "claims": claims, "finishes": finishes, "error": traceback.format_exc()})


def _doomed_claimer(db_url: str, lease_seconds: float, out) -> None:
    """Process A: claim the job, report it, then heartbeat until it is killed with SIGKILL."""
    try:
        engine = make_engine(db_url)
        q = Queue(engine, RetryPolicy(lease_seconds=lease_seconds))
        job = q.claim("worker-a")
        out.put({"job_id": job.id if job else None, "attempt_id": job.attempt_id if job else None,
                 "pid": os.getpid(), "error": None})
        while True:  # alive and heartbeating, until SIGKILL stops it mid-stride
            q.heartbeat(job.id, job.attempt_id, worker_id="worker-a")
            time.sleep(0.2)
    except BaseException:  # noqa: BLE001
        out.put({"job_id": None, "attempt_id": None, "pid": os.getpid(), "error": traceback.format_exc()})


def _successor(db_url: str, lease_seconds: float, deadline: float, out, go) -> None:
    """Process B: claim until the expired job comes back (or the deadline), report, wait for `go`,
    heartbeat once and finish as succeeded."""
    try:
        engine = make_engine(db_url)
        q = Queue(engine, RetryPolicy(lease_seconds=lease_seconds))
        job = None
        while job is None and time.time() < deadline:
            job = q.claim("worker-b")
            if job is None:
                time.sleep(0.1)
        if job is None:
            out.put({"stage": "claimed", "job_id": None, "error": "no job claimed before the deadline"})
            return
        out.put({"stage": "claimed", "job_id": job.id, "attempt_id": job.attempt_id, "attempt": job.attempt,
                 "error": None})
        if not go.wait(timeout=RUN_TIMEOUT):
            out.put({"stage": "finished", "error": "never told to finish"})
            return
        beat = q.heartbeat(job.id, job.attempt_id, worker_id="worker-b")
        done = q.finish(job.id, job.attempt_id, "succeeded", result={"loss": 0.5}, worker_id="worker-b")
        out.put({"stage": "finished", "heartbeat_ok": beat.ok, "finish_ok": done.ok, "state": done.state,
                 "error": None})
        engine.dispose()
    except BaseException:  # noqa: BLE001
        out.put({"stage": "error", "error": traceback.format_exc()})


# ---- helpers -----------------------------------------------------------------------------------------
def _submit(engine, name: str, **fields):
    # Imported here, not at the top: every spawned child imports this module, and pydantic (spec,
    # trainers) would add a third to each child's start-up on a small machine.
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import validate_config

    spec = GridSpec.model_validate({"name": name, "trainer": "noop", **fields})
    return submit_grid(engine, spec, validate_config)


def _get(results, timeout: float):
    try:
        return results.get(timeout=timeout)
    except queue_mod.Empty:
        pytest.fail(f"no message from a child process within {timeout:.0f} s")


def _stop(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=30)


# ---- tests -------------------------------------------------------------------------------------------
def race(worker, db_url: str, workers: int = N_WORKERS):
    """`workers` processes running `worker(db_url, name, barrier, results)`, started together at a barrier;
    returns the processes (joined), each one's report, and the seconds from the barrier to the last report."""
    barrier = SPAWN.Barrier(workers + 1)  # the workers and this process: all go at once
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=worker, args=(db_url, f"w{i:02d}", barrier, results), daemon=True)
                 for i in range(workers)]
    try:
        for p in processes:
            p.start()
        barrier.wait(timeout=START_TIMEOUT)
        started = time.monotonic()
        reports = [_get(results, RUN_TIMEOUT) for _ in processes]  # read before join: no pipe deadlock
        race_seconds = time.monotonic() - started
        for p in processes:
            p.join(timeout=60)
    finally:
        _stop(processes)
    return processes, reports, race_seconds


def test_16_processes_race_to_claim_500_jobs_each_claimed_exactly_once(db_url, engine):
    grid = _submit(engine, "race", axes={"value": [float(i) for i in range(N_JOBS)]})
    assert grid.created == N_JOBS
    with engine.connect() as conn:
        all_ids = set(conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid.grid_id)).scalars())
    assert len(all_ids) == N_JOBS

    processes, reports, race_seconds = race(_race_worker, db_url)

    errors = [f"{r['name']}:\n{r['error']}" for r in reports if r["error"]]
    assert not errors, "worker processes failed:\n" + "\n".join(errors)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]

    claims = [(job_id, attempt_id, r["name"]) for r in reports for job_id, attempt_id in r["claims"]]
    per_job = Counter(job_id for job_id, _, _ in claims)
    doubles = {job_id: n for job_id, n in per_job.items() if n > 1}
    assert not doubles, f"{len(doubles)} jobs claimed more than once, e.g. {dict(list(doubles.items())[:10])}"
    assert set(per_job) == all_ids, f"{len(all_ids - set(per_job))} jobs never claimed"
    assert len(claims) == N_JOBS
    assert len({attempt_id for _, attempt_id, _ in claims}) == N_JOBS  # attempt ids are unique
    # Every finish was accepted (no attempt was fenced out: no lease expired, nobody else took the job).
    finishes = [f for r in reports for f in r["finishes"]]
    assert len(finishes) == N_JOBS
    assert all(ok and state == "succeeded" for _, ok, state in finishes), [f for f in finishes if not f[1]]
    # They really raced: the work was shared between processes.
    busy = {name for _, _, name in claims}
    assert len(busy) >= 2, f"only {busy} claimed anything in {race_seconds:.1f} s"

    # The database agrees.
    with engine.connect() as conn:
        states = dict(conn.execute(
            select(t.jobs.c.state, func.count()).where(t.jobs.c.grid_id == grid.grid_id).group_by(t.jobs.c.state)
        ).all())
        assert states == {"succeeded": N_JOBS}
        assert conn.execute(select(func.count()).select_from(t.attempts)).scalar_one() == N_JOBS
        assert conn.execute(
            select(func.count()).select_from(t.attempts).where(t.attempts.c.outcome == "succeeded")
        ).scalar_one() == N_JOBS
        assert conn.execute(select(func.max(t.jobs.c.attempts))).scalar_one() == 1
        assert conn.execute(select(func.min(t.jobs.c.attempts))).scalar_one() == 1
        per_job_attempts = conn.execute(
            select(t.attempts.c.job_id, func.count()).group_by(t.attempts.c.job_id).having(func.count() > 1)
        ).all()
        assert per_job_attempts == []
        # The attempt each process recorded is the one the database holds for that job.
        stored = dict(conn.execute(select(t.attempts.c.job_id, t.attempts.c.id)).all())
        stored_workers = dict(conn.execute(select(t.attempts.c.id, t.attempts.c.worker_id)).all())
    assert stored == {job_id: attempt_id for job_id, attempt_id, _ in claims}
    assert stored_workers == {attempt_id: name for _, attempt_id, name in claims}
    with engine.connect() as conn:
        results_by_job = dict(conn.execute(
            select(t.jobs.c.id, t.jobs.c.result).where(t.jobs.c.grid_id == grid.grid_id)
        ).all())
        configs = dict(conn.execute(
            select(t.jobs.c.id, t.jobs.c.config).where(t.jobs.c.grid_id == grid.grid_id)
        ).all())
    assert all(results_by_job[i]["loss"] == configs[i]["value"] for i in all_ids)


def test_killed_claimers_lease_expires_then_another_process_finishes_the_job_once(db_url, engine):
    grid = _submit(engine, "lease", config={"value": 3.0})
    assert grid.created == 1

    out_a = SPAWN.Queue()
    a = SPAWN.Process(target=_doomed_claimer, args=(db_url, SHORT_LEASE, out_a), daemon=True)
    out_b = SPAWN.Queue()
    go = SPAWN.Event()
    b = None
    try:
        a.start()
        claimed_a = _get(out_a, START_TIMEOUT)
        assert claimed_a["error"] is None, claimed_a["error"]
        assert claimed_a["job_id"] is not None and claimed_a["pid"] == a.pid
        job_id, stale_attempt = claimed_a["job_id"], claimed_a["attempt_id"]

        # While A's lease holds, nobody else can have the job. (`now=` inside the lease A last wrote:
        # a stalled machine must not let this probe steal the job.)
        with engine.connect() as conn:
            lease_end = conn.execute(select(t.jobs.c.lease_expires_at).where(t.jobs.c.id == job_id)).scalar_one()
        probe = Queue(engine, RetryPolicy(lease_seconds=SHORT_LEASE))
        assert probe.claim("probe", now=min(time.time(), lease_end - 0.01)) is None

        os.kill(a.pid, signal.SIGKILL)  # no goodbye: no finish, no more heartbeats
        a.join(timeout=30)
        assert a.exitcode == -signal.SIGKILL

        # B keeps trying until the expired lease hands the job over (the claim itself requeues it).
        b = SPAWN.Process(target=_successor, args=(db_url, 60.0, time.time() + RUN_TIMEOUT, out_b, go),
                          daemon=True)
        b.start()
        claimed_b = _get(out_b, START_TIMEOUT + RUN_TIMEOUT)
        assert claimed_b["error"] is None, claimed_b["error"]
        assert claimed_b["job_id"] == job_id
        assert claimed_b["attempt_id"] != stale_attempt
        assert claimed_b["attempt"] == 2

        # A's attempt is fenced out while B runs the job...
        local = Queue(engine, RetryPolicy(lease_seconds=60.0))
        beat = local.heartbeat(job_id, stale_attempt, step=7, worker_id="worker-a")
        assert (beat.ok, beat.stop) == (False, True)
        assert beat.reason and stale_attempt in beat.reason
        done = local.finish(job_id, stale_attempt, "succeeded", result={"loss": 99.0}, worker_id="worker-a")
        assert (done.ok, done.stop) == (False, True)
        stale_pointer = local.set_checkpoint(job_id, stale_attempt, {"uri": "local:x", "step": 7}, worker_id="worker-a")
        assert stale_pointer.ok is False
        with engine.connect() as conn:
            row = conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one()
        assert row["state"] == "running" and row["attempt_id"] == claimed_b["attempt_id"]
        assert row["worker_id"] == "worker-b" and row["result"] is None and row["step"] is None
        assert row["losses"] == 1

        go.set()
        finished_b = _get(out_b, RUN_TIMEOUT)
        assert finished_b["error"] is None, finished_b["error"]
        assert finished_b["heartbeat_ok"] and finished_b["finish_ok"] and finished_b["state"] == "succeeded"
        b.join(timeout=30)
        assert b.exitcode == 0
    finally:
        _stop([p for p in (a, b) if p is not None])

    # ...and after B finished it, too: the job completed exactly once, with B's result.
    done = local.finish(job_id, stale_attempt, "succeeded", result={"loss": 99.0}, worker_id="worker-a")
    assert (done.ok, done.stop) == (False, True)
    assert local.heartbeat(job_id, stale_attempt, worker_id="worker-a").ok is False
    with engine.connect() as conn:
        row = conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one()
        history = conn.execute(
            select(t.attempts).where(t.attempts.c.job_id == job_id).order_by(t.attempts.c.started_at)
        ).mappings().all()
    assert row["state"] == "succeeded" and row["result"] == {"loss": 0.5}
    assert row["attempts"] == 2 and row["losses"] == 1 and row["attempt_id"] is None
    assert [(a["id"], a["worker_id"], a["outcome"]) for a in history] == [
        (stale_attempt, "worker-a", "lost"),
        (claimed_b["attempt_id"], "worker-b", "succeeded"),
    ]
    events = [(e["kind"], e["attempt_id"]) for e in reports.job_events(engine, job_id)]
    kinds = [kind for kind, _ in events]
    assert kinds.count("succeeded") == 1 and kinds.count("lost") == 1
    assert (("lost", stale_attempt) in events) and (("succeeded", claimed_b["attempt_id"]) in events)
