"""A trainer that reports odd metrics never stalls, loses or double-runs its job: real `gridfleet worker`
processes against a real `gridfleet serve` on Postgres, and embedded `gridfleet run` on SQLite.

The trainers are user scripts run by the `command` trainer (worker/script_api.py as `gridfleet_script_api`):
one reports NUL and lone-surrogate strings in its metrics and result (stored with U+FFFD, said so by an
`input_cleaned` event), one reports a metric nested deeper than the server accepts (the worker drops
that batch, records a `metrics_dropped` event saying why, and keeps its lease).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from common import schema as t
from common.db import make_engine
from scheduler.reports import grid_results, job_detail, job_events, job_metrics
from tests.e2e.processes import DEADLINE, gridfleet_cmd, job, ok

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

ODD_STRINGS = r'''
import time
import gridfleet_script_api as gf

gf.report(1, loss=0.5, note="a\x00b")
gf.report(2, loss=0.4, **{"s\ud800": 1.0, "t": "\udc00"})
time.sleep(1.5)  # a few heartbeats (0.5 s apart) carry the metrics while the job runs
gf.result(loss=0.25, tag="c\x00d")
'''

TOO_DEEP = r'''
import time
import gridfleet_script_api as gf

deep = 1
for _ in range(100):
    deep = {"a": deep}
gf.report(1, loss=0.5, deep=deep)
time.sleep(1.5)  # the batch is refused, dropped and said so; the lease stays extended
gf.report(2, loss=0.4)
time.sleep(1.0)
gf.result(loss=0.25)
'''

DEEP_RESULT = r'''
import gridfleet_script_api as gf

deep = 1
for _ in range(100):
    deep = {"a": deep}
gf.report(1, loss=0.5)
gf.result(loss=0.25, deep=deep)
'''


def _grid(name: str, script: Path) -> dict:
    return {"name": name, "trainer": "command",
            "config": {"command": [sys.executable, str(script)], "grace_seconds": 5}}


def _one_clean_success(detail: dict) -> None:
    assert detail["state"] == "succeeded", detail
    assert (detail["attempts"], detail["losses"], detail["errors"]) == (1, 0, 0), detail
    assert [a["outcome"] for a in detail["attempt_history"]] == ["succeeded"], detail


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # embedded mode below covers SQLite
def test_odd_metrics_through_a_real_worker_and_server_on_postgres(fleet, db_url, tmp_path):
    odd, deep, deep_result = tmp_path / "odd.py", tmp_path / "deep.py", tmp_path / "deep_result.py"
    odd.write_text(ODD_STRINGS)
    deep.write_text(TOO_DEEP)
    deep_result.write_text(DEEP_RESULT)
    server = fleet.start_server(db_url)
    api = server.api
    ids = {}
    for name, script in (("odd-strings", odd), ("too-deep", deep), ("deep-result", deep_result)):
        ok(api.post("/grids", json={**_grid(name, script), "max_attempts": 1}))
        ids[name] = ok(api.get(f"/grids/{name}/results"))["results"][0]["job_id"]
    fleet.start_worker(server, "w1", grace=10.0)

    for job_id in ids.values():
        fleet.wait_for(lambda: job(api, job_id)["state"] not in ("queued", "running"), f"job {job_id} to end")
    context = fleet.explain()

    detail = job(api, ids["odd-strings"])
    _one_clean_success(detail)
    assert detail["result"] == {"loss": 0.25, "tag": "c\ufffdd"}, context
    metrics = {m["step"]: m for m in ok(api.get(f"/jobs/{ids['odd-strings']}/metrics"))["metrics"]}
    assert metrics[1]["note"] == "a\ufffdb" and metrics[2]["s\ufffd"] == 1.0 and metrics[2]["t"] == "\ufffd", metrics
    kinds = [e["kind"] for e in ok(api.get(f"/jobs/{ids['odd-strings']}/events"))["events"]]
    assert kinds.count("input_cleaned") >= 2 and kinds.count("succeeded") == 1, kinds  # metrics, result

    detail = job(api, ids["too-deep"])
    _one_clean_success(detail)
    events = ok(api.get(f"/jobs/{ids['too-deep']}/events"))["events"]
    dropped = [e["message"] for e in events if e["kind"] == "metrics_dropped"]
    assert len(dropped) == 1 and "nested deeper than 64 levels" in dropped[0], events
    steps = [m["step"] for m in ok(api.get(f"/jobs/{ids['too-deep']}/metrics"))["metrics"]]
    assert 1 not in steps and steps.count(2) == 1, steps  # only the refused batch was dropped, once

    detail = job(api, ids["deep-result"])  # a result that cannot be stored ends the attempt as an error
    assert detail["state"] == "failed" and detail["attempts"] == 1, detail
    assert "the trainer's result was refused" in detail["last_error"], detail
    assert "result: nested deeper than 64 levels" in detail["last_error"], detail
    fleet.assert_clean()


def test_odd_metrics_in_embedded_mode_on_sqlite(fleet, tmp_path):
    home = tmp_path / "home"
    db_url = f"sqlite:///{home / 'gridfleet.db'}"
    odd, deep = tmp_path / "odd.py", tmp_path / "deep.py"
    odd.write_text(ODD_STRINGS)
    deep.write_text(TOO_DEEP)
    grid = _grid("embedded-odd", odd)
    grid["config"] = {"command": ["@SCRIPT@"], "grace_seconds": 5}
    grid["axes"] = {"command": [[sys.executable, str(odd)], [sys.executable, str(deep)]]}
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(grid))
    env = fleet.env(GRIDFLEET_HOME=str(home), DATABASE_URL=db_url, COLUMNS="120")
    run = fleet.spawn("run", [*gridfleet_cmd(), "run", grid_file.name, "--workers", "1"], env)
    assert run.wait(DEADLINE) == 0, fleet.explain()

    engine = make_engine(db_url)
    try:
        rows = {Path(r["config"]["command"][1]).stem: r for r in grid_results(engine, "embedded-odd")}
        odd_job = job_detail(engine, rows["odd"]["job_id"])
        _one_clean_success(odd_job)
        assert odd_job["result"] == {"loss": 0.25, "tag": "c\ufffdd"}, odd_job
        metrics = {m["step"]: m for m in job_metrics(engine, odd_job["id"], None, 100)}
        assert metrics[1]["note"] == "a\ufffdb" and metrics[2]["s\ufffd"] == 1.0, metrics
        assert any(e["kind"] == "input_cleaned" for e in job_events(engine, odd_job["id"], 100))

        deep_job = job_detail(engine, rows["deep"]["job_id"])
        _one_clean_success(deep_job)
        dropped = [e["message"] for e in job_events(engine, deep_job["id"], 100) if e["kind"] == "metrics_dropped"]
        assert len(dropped) == 1 and "nested deeper than 64 levels" in dropped[0], dropped
        with engine.connect() as conn:
            steps = conn.execute(select(t.metrics.c.step).where(t.metrics.c.job_id == deep_job["id"])).scalars().all()
        assert 1 not in steps and steps.count(2) == 1, steps
    finally:
        engine.dispose()
    fleet.assert_clean()
