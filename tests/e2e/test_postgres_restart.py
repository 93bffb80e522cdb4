"""The real Postgres server restarted (pg_ctl restart -m fast) and crashed (-m immediate, then started again)
while `gridfleet serve` and two `gridfleet worker` agents run a grid: every job succeeds exactly once, the
workers ride it out, and the API answers nothing in the 5xx range but 503.

Postgres is a server of this test session's own (tests/pgcluster.py); the API's replies are read from its
uvicorn access log (one line per reply) and its own error log ("unexpected error", tracebacks).
"""
from __future__ import annotations

import re
from collections import Counter

from sqlalchemy import text

from common.db import make_engine
from tests.e2e.processes import Fleet, Proc, ok

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
    engine = make_engine(private_pg_url)
    try:
        with engine.connect() as conn:
            states = dict(conn.execute(text("SELECT id, state FROM jobs")).all())
            wins = dict(conn.execute(text(
                "SELECT job_id, count(*) FROM attempts WHERE outcome = 'succeeded' GROUP BY job_id")).all())
            outcomes = Counter(o for (o,) in conn.execute(text("SELECT outcome FROM attempts")).all())
    finally:
        engine.dispose()
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
