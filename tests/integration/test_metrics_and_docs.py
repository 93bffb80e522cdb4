"""/metrics (Prometheus) and the offline /docs and /redoc, through the real app."""
from __future__ import annotations

import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from api.app import create_app
from common.settings import Settings

TOKEN = "adm-metrics-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_client(db_url: str, **settings) -> TestClient:
    return TestClient(create_app(Settings(database_url=db_url, admin_token=TOKEN, **settings)))


def scrape(client: TestClient, headers=AUTH) -> dict[tuple[str, tuple], float]:
    reply = client.get("/metrics", headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_claims_heartbeats_expiries_and_retries_as_jobs_run(db_url):
    with make_client(db_url, lease_seconds=0.5, expiry_grace_after_start=0.0) as api:
        grid = {"name": "m", "trainer": "noop", "axes": {"value": [1.0, 2.0, 3.0]}, "max_attempts": 3}
        assert api.post("/api/v1/grids", json=grid, headers=AUTH).status_code == 201
        before = scrape(api)
        assert value(before, "gridfleet_jobs", state="queued") == 3
        assert value(before, "gridfleet_claims_total", result="job") == 0

        reg = api.post("/api/v1/workers/register", json={"name": "w", "host": "h", "trainers": ["noop"]},
                       headers=AUTH).json()
        wid = reg["worker_id"]
        headers = {**AUTH, "X-Gridfleet-Worker-Secret": reg["worker_secret"]}

        def claim():
            reply = api.post(f"/api/v1/workers/{wid}/claim", json={"trainers": ["noop"]}, headers=headers)
            assert reply.status_code == 200, reply.text
            return reply.json()["job"]

        def finish(job, outcome):
            body = {"job_id": job["id"], "attempt_id": job["attempt_id"], "outcome": outcome,
                    **({"result": {"loss": 1.0}} if outcome == "succeeded" else {"error": "boom"})}
            assert api.post(f"/api/v1/workers/{wid}/finish", json=body, headers=headers).status_code == 200

        first = claim()
        beat = {"job_id": first["id"], "attempt_id": first["attempt_id"], "step": 1}
        assert api.post(f"/api/v1/workers/{wid}/heartbeat", json=beat, headers=headers).status_code == 200
        stale = {**beat, "attempt_id": "0" * 32}
        assert api.post(f"/api/v1/workers/{wid}/heartbeat", json=stale, headers=headers).status_code == 409
        finish(first, "succeeded")
        finish(claim(), "error")  # retried later (backoff), so counted as a retry of kind error
        third = claim()  # its lease runs out unheartbeaten
        assert claim() is None  # the errored job waits out its backoff
        time.sleep(0.7)
        again = claim()  # the scan before answering finds the expired lease and requeues the job as lost
        assert again["id"] == third["id"] and again["attempt_id"] != third["attempt_id"]

        after = scrape(api)
    assert value(after, "gridfleet_claims_total", result="job") == 4
    assert value(after, "gridfleet_claims_total", result="none") >= 1
    assert value(after, "gridfleet_heartbeats_total", result="ok") == 1
    assert value(after, "gridfleet_heartbeats_total", result="stale") == 1
    assert value(after, "gridfleet_finishes_total", outcome="succeeded") == 1
    assert value(after, "gridfleet_retries_total", kind="error") == 1
    assert value(after, "gridfleet_lease_expiries_total") == 1
    assert value(after, "gridfleet_jobs", state="succeeded") == 1
    assert value(after, "gridfleet_jobs", state="running") == 1
    assert value(after, "gridfleet_jobs", state="queued") == 1
    claims = value(after, "gridfleet_request_seconds_count", method="POST",
                   route="/api/v1/workers/{worker_id}/claim", status="200")
    assert claims == value(after, "gridfleet_claims_total", result="job") + value(
        after, "gridfleet_claims_total", result="none")
    assert not any(wid in str(labels) for _, labels in after)  # routes by template, not by worker id


def test_metrics_need_a_token_unless_opened(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with make_client(url) as api:
        assert api.get("/metrics").status_code == 401
        assert api.get("/metrics", headers={"Authorization": "Bearer wrong-token-xxxxxxxx"}).status_code == 401
    with make_client(f"sqlite:///{tmp_path / 'b.db'}", metrics_public=True) as api:
        assert "gridfleet_jobs" in api.get("/metrics").text


@pytest.mark.parametrize("page, assets", [("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
                                          ("/redoc", ("redoc.standalone.js",))])
def test_docs_pages_load_only_local_assets_and_those_are_served(tmp_path, page, assets):
    with make_client(f"sqlite:///{tmp_path / 'd.db'}") as api:
        html = api.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href|url)\s*[=:(]\s*['"]([^'"]+)['"]""", html.text)
        assert urls, html.text
        outside = [u for u in urls if not u.startswith("/")]
        assert outside == [], f"{page} refers to other hosts: {outside}"
        assert "cdn" not in html.text and "fonts.googleapis" not in html.text
        for name in assets:
            assert f"/docs-assets/{name}" in urls
            served = api.get(f"/docs-assets/{name}")
            assert served.status_code == 200 and len(served.content) > 100_000
            kind = "text/css" if name.endswith(".css") else "javascript"
            assert kind in served.headers["content-type"]
        assert api.get("/openapi.json").json()["paths"]["/metrics"]
