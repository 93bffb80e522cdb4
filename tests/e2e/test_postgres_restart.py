"""The real Postgres server restarted (pg_ctl restart -m fast) and crashed (-m immediate, then started again)
while `gridfleet serve` and two `gridfleet worker` agents run a grid: every job succeeds exactly once, the
workers ride it out, and the API answers nothing in the 5xx range but 503. Then the case a restart can
cause but not on demand: a finish that committed while its reply was lost, which the worker retries.

Postgres is a server of this test session's own (tests/pgcluster.py); the API's replies are read from its
uvicorn access log (one line per reply) and its own error log ("unexpected error", tracebacks).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest
from sqlalchemy import text

from common.db import make_engine
from tests.e2e.processes import Fleet, Proc, ok
from tests.http_faults import LoseOneReply

GRID = "e2e-pg-restart"
JOBS = 8
# Short jobs that report a metric and checkpoint every other step, so restarts land on heartbeats,
# checkpoints, claims and finishes alike.
CONFIG = {"seconds": 1.5, "steps": 6, "checkpoint_every": 2}
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')
FINISHED = re.compile(r"job (\d+) finished: succeeded")


def replies(server: Proc) -> list[tuple[str, str, int]]:
    """(method, path, status) of every reply the server logged so far."""
    text_ = server.log_path.read_text(errors="replace")
    return [(m["method"], m["path"], int(m["status"])) for m in ACCESS_LINE.finditer(text_)]


def succeeded(api) -> int:
    return ok(api.get(f"/grids/{GRID}"))["counts"]["succeeded"]


def attempts_by_job(db_url: str) -> tuple[dict[int, str], dict[int, int], Counter]:
    """(job id -> state, job id -> succeeded attempts, attempt outcome -> count), from the database."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            states = dict(conn.execute(text("SELECT id, state FROM jobs")).all())
            wins = dict(conn.execute(text(
                "SELECT job_id, count(*) FROM attempts WHERE outcome = 'succeeded' GROUP BY job_id")).all())
            outcomes = Counter(o for (o,) in conn.execute(text("SELECT outcome FROM attempts")).all())
    finally:
        engine.dispose()
    return states, wins, outcomes


def test_postgres_restarted_under_load_every_job_succeeds_once_and_no_5xx_but_503(private_pg_url, pg_cluster,
                                                                               fleet: Fleet):
    server = fleet.start_server(private_pg_url, log_level="info")
    api = server.api
    ok(api.post("/grids", json={"name": GRID, "trainer": "sleep", "config": CONFIG, "seeds": list(range(JOBS))}))
    workers = [fleet.start_worker(server, name) for name in ("w1", "w2")]

    fleet.wait_for(lambda: succeeded(api) >= 1 and ok(api.get(f"/grids/{GRID}"))["counts"]["running"] >= 1,
                   "the first job to succeed while others run")
    pg_cluster.restart("fast")  # sessions ended with AdminShutdown, a short refusal window, then back
    before = succeeded(api)
    fleet.wait_for(lambda: succeeded(api) >= min(JOBS, before + 2), "two more jobs to succeed after the restart")

    # A crash: backends killed, connections dropped mid-reply, crash recovery at start. Keep it down until a
    # worker has surely met it (a 503 on a worker endpoint), so the outage is not over before anyone saw it.
    seen = sum(1 for _, path, status in replies(server.proc) if status == 503 and "/workers/" in path)
    pg_cluster.stop("immediate")
    try:
        fleet.wait_for(lambda: sum(1 for _, path, status in replies(server.proc)
                                   if status == 503 and "/workers/" in path) > seen,
                       "a worker request to meet the stopped database")
    finally:
        pg_cluster.start()
    fleet.wait_for(lambda: succeeded(api) == JOBS, f"all {JOBS} jobs to succeed")

    # Exactly one succeeded attempt per job, and no job's trainer ran to the end twice.
    states, wins, outcomes = attempts_by_job(private_pg_url)
    context = f"\nattempt outcomes: {dict(outcomes)}\n{fleet.explain()}"
    assert len(states) == JOBS and set(states.values()) == {"succeeded"}, f"{states}{context}"
    assert wins == {job_id: 1 for job_id in states}, f"succeeded attempts per job: {wins}{context}"
    completions = Counter(int(job_id) for w in workers for job_id in FINISHED.findall(w.log_path.read_text()))
    assert completions == {job_id: 1 for job_id in states}, f"trainer completions per job: {completions}{context}"
    assert all(w.alive() for w in workers), context

    # The API's answers: the access log names every reply; nothing in the 5xx range but 503.
    answered = replies(server.proc)
    statuses = Counter(status for _, _, status in answered)
    assert statuses[200] > JOBS, f"the access log was not read: {statuses}{context}"
    server_errors = [r for r in answered if r[2] >= 500 and r[2] != 503]
    assert not server_errors, f"server errors other than 503: {server_errors[:20]}{context}"
    assert statuses[503] >= 1, statuses
    server_log = server.proc.log_path.read_text(errors="replace")
    assert "unexpected error" not in server_log and "Exception in ASGI application" not in server_log, context
    fleet.assert_clean()  # no traceback in the server's or the agents' logs
    print(f"\nreplies by status: {dict(sorted(statuses.items()))}; attempt outcomes: {dict(outcomes)}")


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_finish_that_committed_but_lost_its_reply_is_retried_harmlessly_and_the_worker_goes_on(db_url,
                                                                                                fleet: Fleet):
    """The worker's retry of that finish is refused as stale (409): the agent logs it and claims the next job;
    the job stays succeeded, by one attempt."""
    server = fleet.start_server(db_url)
    ok(server.api.post("/grids", json={"name": GRID, "trainer": "sleep", "config": {"seconds": 0.2, "steps": 2},
                                       "seeds": [0, 1]}))
    proxy = LoseOneReply(server.url, "/finish").start()
    try:
        worker = fleet.start_worker(dataclasses.replace(server, url=proxy.url), "w1")
        fleet.wait_for(lambda: succeeded(server.api) == 2, "both jobs to succeed")
    finally:
        proxy.close()
    states, wins, outcomes = attempts_by_job(db_url)
    context = f"\nattempt outcomes: {dict(outcomes)}\n{fleet.explain()}"
    assert len(proxy.lost) == 1 and proxy.lost[0].endswith("/finish"), proxy.lost
    assert set(states.values()) == {"succeeded"} and wins == {job_id: 1 for job_id in states}, f"{wins}{context}"
    assert outcomes == {"succeeded": 2}, context  # nothing was lost, retried or run twice
    log = worker.log_path.read_text()
    assert len(FINISHED.findall(log)) == 2 and "finish: cannot reach the server" in log, context
    assert worker.alive(), context
    fleet.assert_clean()
