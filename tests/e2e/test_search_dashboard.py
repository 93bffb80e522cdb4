"""A search on the dashboard, in a real headless browser against a real `gridfleet serve` (SQLite): the grids
page shows trials done of n_trials, the grid page the search line with the best trial the API reports. The
trials are run by this test through the queue on the same database (what a worker does, minus its start-up).
"""
from __future__ import annotations

import os
from pathlib import Path

from common.db import make_engine
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.search import Searches
from tests.e2e import test_dashboard
from tests.e2e.processes import ok
from worker.trainers.objective import Config, value

browser = test_dashboard.browser  # the fixture: Debian's chromium, headless
TIMEOUT_MS = test_dashboard.TIMEOUT_MS
GRID = "dash-search"
N_TRIALS = 6


def test_the_dashboard_shows_a_search(fleet, tmp_path, browser):
    db_url = f"sqlite:///{tmp_path / 'gridfleet.db'}"
    server = fleet.start_server(db_url)
    ok(server.api.post("/grids", json={"name": GRID, "trainer": "objective", "search": {
        "sampler": "random", "n_trials": N_TRIALS, "parallel": 2, "metric": "loss",
        "space": {"x": {"type": "float", "low": -5, "high": 5}, "level": {"type": "int", "low": 0, "high": 4}}}}))
    engine = make_engine(db_url)
    try:
        queue, searches = Queue(engine, RetryPolicy(lease_seconds=60.0)), Searches(engine)
        worker_id = queue.register_worker("dash-search-worker", "h", ["objective"])
        for _ in range(100):
            job = queue.claim(worker_id)
            if job is None:
                if ok(server.api.get(f"/grids/{GRID}"))["search"]["state"] == "done":
                    break
                searches.advance(ok(server.api.get(f"/grids/{GRID}"))["id"])
                continue
            queue.finish(job.id, job.attempt_id, "succeeded", result={"loss": value(Config(**job.config))},
                         worker_id=worker_id)
            searches.after_finish([job.id])
        searches.close()
    finally:
        engine.dispose()
    search = ok(server.api.get(f"/grids/{GRID}"))["search"]
    assert (search["done"], search["state"]) == (N_TRIALS, "done")

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.fill("#token", server.admin_token)
    page.click("#sign-in button")
    page.wait_for_selector(f"#grids tr[data-grid='{GRID}'] [data-trials='{N_TRIALS}']")
    assert f"{N_TRIALS}/{N_TRIALS} trials" in page.inner_text(f"#grids tr[data-grid='{GRID}']")

    page.click(f"#grids a[href='#/grid/{GRID}']")
    page.wait_for_selector("#search[data-state='done']")
    line = page.inner_text("#search")
    assert f"random · {N_TRIALS}/{N_TRIALS} trials done · 0 in flight · minimize loss · finished" in line, line
    best = search["best"]
    assert f"trial {best['trial']}" in line and f"level={best['params']['level']}" in line, (line, best)
    assert page.get_attribute(f"#search a[href='#/job/{best['job_id']}']", "href") == f"#/job/{best['job_id']}"
    shots = Path(os.environ.get("GRIDFLEET_SCREENSHOTS") or tmp_path)
    page.screenshot(path=str(shots / "search-grid.png"))
    fleet.assert_clean()
