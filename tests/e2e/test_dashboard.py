"""The dashboard in a real headless browser (Debian's chromium driven by Playwright) against a real
`gridfleet serve` while a real `gridfleet worker` trains a small sleep grid.

One test walks the pages as a user would: a wrong token is refused, a right one signs in; the grids page,
the grid page (which must update while jobs finish), a job and the workers show the numbers the JSON API
gives; the charts hold the points of the jobs shown (read back from the uPlot instances and the SVG); and
the browser never asks any host but the server. Screenshots of each page go to $GRIDFLEET_SCREENSHOTS (or
the test's tmp dir); docs/dashboard/*.png are copies.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright import sync_api

from tests.e2e.processes import ok

CHROMIUM = "/usr/bin/chromium"
GRID = "dash-demo"
FAILING = "dash-failing"
STEPS = [3, 6]
SECONDS = [1.5, 2.5]
TIMEOUT_MS = 60_000


def _close(shown: str, value: float) -> bool:
    """A number as the page prints it (toPrecision(4)) against the API's value."""
    return math.isclose(float(shown), value, rel_tol=1e-3, abs_tol=1e-12)


def _curve(chart, series: int) -> list[tuple[float, float]]:
    xs, ys = chart["data"][0], chart["data"][series]
    return [(x, y) for x, y in zip(xs, ys) if y is not None]


READ_CHART = """(name) => {
  const el = document.querySelector(`[data-chart="${name}"]`);
  const u = el && el.uplot;
  return u ? {labels: u.series.slice(1).map(s => s.label), data: u.data, jobs: el.jobIds || null} : null;
}"""


@pytest.fixture
def browser():
    assert Path(CHROMIUM).exists(), "needs Debian's chromium (deploy/test.sh installs it: apt-get install chromium)"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_dashboard_pages_in_a_real_browser(fleet, tmp_path, browser):
    shots = Path(os.environ.get("GRIDFLEET_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    server = fleet.start_server(f"sqlite:///{tmp_path / 'gridfleet.db'}")
    api = server.api
    ok(api.post("/grids", json={"name": GRID, "trainer": "sleep", "config": {"checkpoint_every": 2},
                                "axes": {"steps": STEPS, "seconds": SECONDS}, "objective": "min:loss"}))
    # A job that fails at its first step on each of its two attempts: the job page lists both.
    ok(api.post("/grids", json={"name": FAILING, "trainer": "sleep", "config": {"seconds": 0.1, "fail_at_step": 0},
                                "max_attempts": 2}))
    fleet.start_worker(server, "dash-worker-1")
    # A worker that only reports a self-update (as `--self-update` does): the workers page shows the event.
    with httpx.Client(base_url=server.url + "/api/v1", timeout=30.0,
                      headers={"Authorization": f"Bearer {server.worker_token}"}) as as_worker:
        other = ok(as_worker.post("/workers/register", json={"name": "dash-updater", "host": "studio-7",
                                                              "gpus": ["NVIDIA H100 80GB"], "code_rev": "c0ffee1"}))
        ok(as_worker.post(f"/workers/{other['worker_id']}/worker_events",
                          headers={"X-Gridfleet-Worker-Secret": other["worker_secret"]},
                          json={"kind": "self_update", "message": "updated c0ffee0 -> c0ffee1"}))

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")

    # A wrong token is refused and nothing is shown.
    page.fill("#token", "gf_not_a_real_token_0000000000")
    page.click("#sign-in button")
    page.wait_for_selector("#sign-in-error:has-text('Refused')")
    assert page.locator("#grids").count() == 0
    assert page.evaluate("sessionStorage.getItem('gridfleet-token')") is None

    # Sign in: the grids page, with the worker on the grid while it trains.
    page.fill("#token", server.admin_token)
    page.click("#sign-in button")
    row = page.locator(f"#grids tr[data-grid='{GRID}']")
    row.wait_for()
    assert server.admin_token not in page.content()
    assert int(row.locator("[data-count=queued]").inner_text()) + int(row.locator("[data-count=running]").inner_text()) \
        + int(row.locator("[data-count=succeeded]").inner_text()) == 4
    page.wait_for_selector(f"#grids tr[data-grid='{GRID}'] td[data-workers='1']:has-text('dash-worker-1')")
    page.screenshot(path=str(shots / "grids.png"))

    # The grid page updates while jobs finish.
    page.click(f"#grids a[href='#/grid/{GRID}']")
    page.wait_for_selector("#progress")
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        done = int(page.get_attribute("#progress", "data-done"))
        if not seen or seen[-1] != done:
            seen.append(done)
        if done == 4:
            break
        time.sleep(0.2)
    assert seen[-1] == 4, f"the grid page never showed 4 done jobs: {seen}\n{fleet.explain()}"
    assert seen[0] < 4 and len(seen) >= 2, f"the grid page did not update while jobs ran: {seen}"
    page.wait_for_selector("[data-chart='parallel'] polyline >> nth=3")

    # The results table holds the API's numbers.
    results = ok(api.get(f"/grids/{GRID}/results"))["results"]
    assert [r["state"] for r in results] == ["succeeded"] * 4
    for r in results:
        cells = page.locator(f"#results tr[data-job='{r['job_id']}']")
        assert int(cells.locator("td[data-col='config.steps']").inner_text()) == r["config"]["steps"]
        assert float(cells.locator("td[data-col='config.seconds']").inner_text()) == r["config"]["seconds"]
        assert _close(cells.locator("td[data-col='metric.loss']").inner_text(), r["result"]["loss"])
    # Sorting by loss descending, then filtering on a swept key.
    page.click("#results th[data-col='metric.loss']")
    page.click("#results th[data-col='metric.loss']")
    shown = [int(j) for j in page.locator("#results tbody tr").evaluate_all("rows => rows.map(r => r.dataset.job)")]
    assert shown == [r["job_id"] for r in sorted(results, key=lambda r: (-r["result"]["loss"], r["job_id"]))]
    page.fill("#results input[data-filter='config.steps']", "=6")
    page.press("#results input[data-filter='config.steps']", "Enter")
    page.wait_for_function("document.querySelectorAll('#results tbody tr').length === 2")
    filtered = page.locator("#results tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.job)")
    assert sorted(filtered) == sorted(r["job_id"] for r in results if r["config"]["steps"] == 6)
    checks = page.evaluate("""async () => { const {matches} = await import('/dashboard/static/grid.js');
      return [matches(0.4, '<0.5'), matches(0.5, '<0.5'), matches(3, '<=3'), matches(2, '>=3'), matches(true, '=true'),
              matches(false, '=true'), matches('gru_cell', 'GRU'), matches(null, '>1'), matches('x', '>1')]; }""")
    assert checks == [True, False, True, False, True, False, True, False, False]
    page.fill("#results input[data-filter='config.steps']", "")
    page.press("#results input[data-filter='config.steps']", "Enter")
    page.wait_for_function("document.querySelectorAll('#results tbody tr').length === 4")

    # Loss curves: one series per shown job, named by what differs, holding that job's reported points.
    curves = page.evaluate(READ_CHART, "curves")
    swept = ok(api.get(f"/dashboard/grids/{GRID}"))["swept"]
    assert sorted(swept) == ["seconds", "steps"]
    by_label = {", ".join(f"{k}={r['config'][k]}" for k in swept): r for r in results}
    assert sorted(curves["labels"]) == sorted(by_label)
    for i, name in enumerate(curves["labels"], start=1):
        metrics = ok(api.get(f"/jobs/{by_label[name]['job_id']}/metrics"))["metrics"]
        assert _curve(curves, i) == [(m["step"], m["loss"]) for m in metrics]

    # Seed 001's plots: every run by rank, loss against each swept key, and the runs below a threshold.
    losses = sorted(r["result"]["loss"] for r in results)
    assert page.evaluate(READ_CHART, "all-runs")["data"][1] == losses
    by_steps = page.evaluate(READ_CHART, "by-key:steps")
    assert sorted(zip(by_steps["data"][0], by_steps["data"][1])) == \
        sorted((r["config"]["steps"], r["result"]["loss"]) for r in results)
    threshold = (losses[0] + losses[-1]) / 2
    page.fill("#threshold", str(threshold))
    page.press("#threshold", "Enter")
    page.wait_for_selector("#below [data-chart='below:steps']")
    below = page.evaluate(READ_CHART, "below:seconds")
    assert sorted(below["data"][1]) == [v for v in losses if v < threshold]

    # Parallel coordinates: a line per finished job carrying its loss; importance: steps explains it all.
    values = page.locator("[data-chart='parallel'] polyline").evaluate_all("ls => ls.map(l => +l.dataset.value)")
    assert sorted(values) == losses
    ranking = ok(api.get(f"/dashboard/grids/{GRID}"))["importance"]
    assert [i["key"] for i in ranking] == ["steps", "seconds"] and math.isclose(ranking[0]["score"], 1.0)
    assert page.locator("#importance tbody tr").evaluate_all("rs => rs.map(r => r.dataset.key)") == ["steps", "seconds"]
    page.screenshot(path=str(shots / "grid.png"), full_page=True)

    # A job: its curve, its one attempt by our worker, its checkpoint pointer.
    best = min(results, key=lambda r: r["result"]["loss"])
    page.click("#best a")
    page.wait_for_selector("#job-state:has-text('succeeded')")
    detail = ok(api.get(f"/jobs/{best['job_id']}"))
    metrics = ok(api.get(f"/jobs/{best['job_id']}/metrics"))["metrics"]
    assert _curve(page.evaluate(READ_CHART, "metric:loss"), 1) == [(m["step"], m["loss"]) for m in metrics]
    attempts = page.locator("#attempts tbody tr")
    assert attempts.count() == len(detail["attempt_history"]) == 1
    assert "dash-worker-1" in attempts.inner_text() and "succeeded" in attempts.inner_text()
    assert f"step {detail['checkpoint']['step']}" in page.inner_text("#checkpoint")
    assert page.locator("#checkpoint a").count() == 0  # a local checkpoint: no Hub link
    hub = page.evaluate("async () => { const {hubLink} = await import('/dashboard/static/job.js');"
                        " return [hubLink('hf://o/r/grid-1/job-2/c.pt', 'abc'), hubLink('hf://o/r/x.pt'),"
                        " hubLink('local:/tmp/c.pt', 'abc')]; }")
    assert hub == ["https://huggingface.co/o/r/blob/abc/grid-1/job-2/c.pt", "https://huggingface.co/o/r", None]
    page.screenshot(path=str(shots / "job.png"), full_page=True)

    # The failing job: each attempt with its worker, outcome and error.
    failing = ok(api.get(f"/grids/{FAILING}/results"))["results"][0]
    fleet.wait_for(lambda: ok(api.get(f"/jobs/{failing['job_id']}"))["state"] == "failed", "the failing job to fail")
    history = ok(api.get(f"/jobs/{failing['job_id']}"))["attempt_history"]
    page.goto(f"{server.url}/#/job/{failing['job_id']}")
    page.wait_for_selector("#job-state:has-text('failed')")
    shown = page.locator("#attempts tbody tr")
    assert shown.evaluate_all("rs => rs.map(r => r.dataset.attempt)") == [a["id"] for a in history]
    assert len(history) == 2 and all(a["outcome"] == "error" for a in history)
    for i, attempt in enumerate(history):
        text = shown.nth(i).inner_text()
        assert "dash-worker-1" in text and "error" in text and "asked to fail at step 0" in text
        assert math.isclose(float(shown.nth(i).locator("td[data-duration]").get_attribute("data-duration")),
                            attempt["ended_at"] - attempt["started_at"])

    # Workers, with the other worker's self-update event.
    page.click("header a[href='#/workers']")
    worker_row = page.locator("#workers tr[data-worker='dash-worker-1']")
    worker_row.wait_for()
    updater = page.locator("#workers tr[data-worker='dash-updater']")
    assert "NVIDIA H100 80GB" in updater.inner_text() and "c0ffee1" in updater.inner_text()
    page.wait_for_selector("#worker-events td:has-text('updated c0ffee0 -> c0ffee1')")
    listed = {w["name"]: w for w in ok(api.get("/workers"))["workers"]}["dash-worker-1"]
    assert listed["alive"] and worker_row.locator("td[data-alive='true']").count() == 1
    assert worker_row.locator("td[data-job]").get_attribute("data-job") == str(listed["current_job_id"] or "")
    page.screenshot(path=str(shots / "workers.png"), full_page=True)

    # Back on the grids page, the finished grid's numbers are the API's.
    page.click("header a[href='#/grids']")
    row = page.locator(f"#grids tr[data-grid='{GRID}']")
    row.wait_for()
    page.wait_for_selector(f"#grids tr[data-grid='{FAILING}'] [data-count=failed]:has-text('1')")
    summary = ok(api.get(f"/grids/{GRID}"))
    for state, count in summary["counts"].items():
        assert int(row.locator(f"[data-count={state}]").inner_text()) == count
    listed = [g["name"] for g in ok(api.get("/grids"))["grids"]]
    assert page.locator("#grids tbody tr").evaluate_all("rs => rs.map(r => r.dataset.grid)") == listed
    assert row.locator("[data-progress='100']").count() == 1
    assert float(row.locator("td[data-best]").get_attribute("data-best")) == summary["best"]["value"]

    # Sign out: the token leaves the tab.
    page.click("#sign-out")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('gridfleet-token')") is None

    origin = urlsplit(server.url).netloc
    strangers = [u for u in requests if urlsplit(u).netloc != origin]
    assert not strangers, f"the browser asked other hosts: {strangers}"
    assert all(server.admin_token not in u for u in requests)
    fleet.assert_clean()
    if os.environ.get("GRIDFLEET_SCREENSHOTS_TO_DOCS"):  # refresh docs/dashboard/*.png from this run
        docs = Path(__file__).resolve().parents[2] / "docs" / "dashboard"
        docs.mkdir(exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, docs / shot.name)
