"""A worker's log holds its job lines, not one line per HTTP request."""
from __future__ import annotations

import logging

import httpx

from worker import logs


def test_requests_are_not_logged_but_jobs_and_http_warnings_are(caplog, monkeypatch):
    for name in logs.QUIET:  # leave the test process's loggers as they were
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    logs.configure()
    caplog.set_level(logging.INFO)  # the root level a worker runs at; named loggers keep their own
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True})))
    client.post("http://server/api/v1/workers/w/heartbeat", json={})
    logging.getLogger("worker.agent").info("job 3 finished: succeeded -> succeeded")
    logging.getLogger("httpx").warning("connection pool is full")
    lines = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("worker.agent", "job 3 finished: succeeded -> succeeded") in lines
    assert ("httpx", "connection pool is full") in lines
    assert not any("HTTP Request" in message for _, message in lines), lines


def test_a_finished_jobs_line_sums_it_up_without_curves():
    assert logs.job_summary(40, {"loss": 0.025, "steps": 40, "loss_curve": [[1, 2.0]], "done": True}) == \
        " (step 40; loss=0.025, steps=40)"
    assert logs.job_summary(None, None) == ""
    assert logs.job_summary(7, None) == " (step 7)"
