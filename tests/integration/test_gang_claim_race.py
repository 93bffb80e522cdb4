"""Gang claims raced by real OS processes, on SQLite and on Postgres (the issue's test): 16 worker processes,
released together, claim gangs of up to K = 8 from 500 noop jobs in several fuse groups (and some that never
fuse), heartbeat and finish each gang in one batched call. Every job is claimed exactly once and finished
once, and no gang mixes fuse keys. Plumbing as tests/integration/test_claim_race.py."""
from __future__ import annotations

import traceback
from collections import Counter

from sqlalchemy import func, select

from common import schema as t
from common.db import make_engine
from scheduler.reports import job_events
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from tests.integration.test_claim_race import LONG_LEASE, N_JOBS, START_TIMEOUT, race

K = 8
GROUPS = ["a", "b", "c", None]  # None: never fused, claimed one at a time


def _gang_worker(db_url: str, name: str, barrier, results) -> None:
    from scheduler.gang import MemberBeat, MemberFinish, claim_gang, finish_gang, heartbeat_gang

    gangs: list[list[tuple[int, str]]] = []
    finishes: list[tuple[int, bool, str | None]] = []
    refused_beats = 0
    try:
        engine = make_engine(db_url)
        q = Queue(engine, RetryPolicy(lease_seconds=LONG_LEASE))
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        barrier.wait(timeout=START_TIMEOUT)
        while gang := claim_gang(q, name, max_jobs=K):
            gangs.append([(job.id, job.attempt_id) for job in gang])
            beats = heartbeat_gang(q, name, [MemberBeat(job.id, job.attempt_id, step=1) for job in gang])
            refused_beats += sum(not r.ok for r in beats)
            replies = finish_gang(q, name, [MemberFinish(job.id, job.attempt_id, "succeeded",
                                                         result={"loss": job.config["value"]}) for job in gang])
            finishes += [(job.id, r.ok, r.state) for job, r in zip(gang, replies)]
        engine.dispose()
        results.put({"name": name, "gangs": gangs, "finishes": finishes, "refused": refused_beats, "error": None})
    except BaseException:  # noqa: BLE001 - report everything to the test process
        results.put({"name": name, "gangs": gangs, "finishes": finishes, "refused": refused_beats,
                     "error": traceback.format_exc()})


def test_16_processes_race_gang_claims_of_8_over_500_jobs_each_claimed_and_finished_once(db_url, engine):
    from scheduler.grids import submit_grid
    from scheduler.spec import GridSpec
    from worker.trainers import fuse_key, validate_config

    spec = GridSpec.model_validate({"name": "gang-race", "trainer": "noop", "zip": {
        "value": [float(i) for i in range(N_JOBS)], "fuse_group": [GROUPS[i % len(GROUPS)] for i in range(N_JOBS)]}})
    grid = submit_grid(engine, spec, validate_config, fuse_key=fuse_key)
    assert grid.created == N_JOBS
    with engine.connect() as conn:
        keys = dict(conn.execute(select(t.jobs.c.id, t.jobs.c.fuse_key)).all())
    assert len(keys) == N_JOBS and len(set(keys.values())) == len(GROUPS)

    processes, reports, race_seconds = race(_gang_worker, db_url)

    errors = [f"{r['name']}:\n{r['error']}" for r in reports if r["error"]]
    assert not errors, "worker processes failed:\n" + "\n".join(errors)
    gangs = [(r["name"], gang) for r in reports for gang in r["gangs"]]
    claims = Counter(job_id for _, gang in gangs for job_id, _ in gang)
    doubles = {job_id: n for job_id, n in claims.items() if n > 1}
    assert not doubles, f"{len(doubles)} jobs claimed more than once, e.g. {dict(list(doubles.items())[:10])}"
    assert set(claims) == set(keys)
    for _, gang in gangs:
        assert 1 <= len(gang) <= K
        assert len({keys[job_id] for job_id, _ in gang}) == 1, gang  # one fuse key per gang
        if keys[gang[0][0]] is None:
            assert len(gang) == 1
    assert sum(len(g) > 1 for _, g in gangs) > 0  # gangs really formed
    assert all(r["refused"] == 0 for r in reports)  # nobody else could touch a member
    finishes = [f for r in reports for f in r["finishes"]]
    assert sorted(job_id for job_id, _, _ in finishes) == sorted(keys)  # each finished once
    assert all(ok and state == "succeeded" for _, ok, state in finishes)
    assert len({name for name, _ in gangs}) >= 2, f"only one process claimed anything in {race_seconds:.1f} s"

    attempt_of = {job_id: (attempt_id, name) for name, gang in gangs for job_id, attempt_id in gang}
    with engine.connect() as conn:
        states = dict(conn.execute(select(t.jobs.c.state, func.count()).group_by(t.jobs.c.state)).all())
        stored = {r.job_id: (r.id, r.worker_id) for r in conn.execute(select(t.attempts))}
        outcomes = Counter(conn.execute(select(t.attempts.c.outcome)).scalars())
        results_ok = all(r.result == {"loss": r.config["value"]}
                         for r in conn.execute(select(t.jobs.c.result, t.jobs.c.config)))
        job_ids = list(conn.execute(select(t.jobs.c.id)).scalars())
    succeeded_events = sum(e["kind"] == "succeeded" for j in job_ids for e in job_events(engine, j))
    assert states == {"succeeded": N_JOBS}
    assert stored == attempt_of  # one attempt per job: the one its claimer got, by that worker
    assert outcomes == {"succeeded": N_JOBS}
    assert results_ok and succeeded_events == N_JOBS
