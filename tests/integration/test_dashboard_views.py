"""The dashboard's read endpoints (api/dashboard/) on SQLite and Postgres, through the app: the page
itself is public and holds nothing secret, the data needs a token, a grid's view names what differs and
ranks the swept keys by how much of the objective's spread they explain (eta squared, checked by hand)."""
from __future__ import annotations

import fnmatch
import math
import tomllib
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from api.app import create_app
from api.dashboard import views
from common.settings import Settings

TOKEN = "gf_dashboard_test_admin_0123456789"
# loss by (steps, seconds): steps explains most of the spread, seconds a little.
LOSS = {(2, 0.1): 1.0, (2, 0.2): 1.2, (4, 0.1): 3.0, (4, 0.2): 3.4}


@pytest.fixture
def client(db_url):
    app = create_app(Settings(database_url=db_url, admin_token=TOKEN))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        spec = {"name": "dash", "trainer": "sleep", "config": {"checkpoint_every": 1},
                "axes": {"steps": [2, 4], "seconds": [0.1, 0.2]}, "objective": "min:loss"}
        done = [{"config": {"checkpoint_every": 1, "steps": s, "seconds": sec}, "seed": 0,
                 "result": {"loss": loss, "note": "text is not a metric"}} for (s, sec), loss in LOSS.items()]
        reply = c.post("/api/v1/grids/import", json={"grid": spec, "done": done[:3]})
        assert reply.status_code == 201, reply.text
        yield c


def _eta_squared(key_index: int, values: dict) -> float:
    mean = sum(values.values()) / len(values)
    total = sum((v - mean) ** 2 for v in values.values())
    groups: dict = {}
    for key, v in values.items():
        groups.setdefault(key[key_index], []).append(v)
    return sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values()) / total


def test_grid_view_labels_and_importance(client):
    view = client.get("/api/v1/dashboard/grids/dash").json()
    assert sorted(view["swept"]) == ["seconds", "steps"]
    assert view["objective_metric"] == "loss" and view["metrics"] == ["loss"]
    rows = {(r["config"]["steps"], r["config"]["seconds"]): r for r in view["rows"]}
    assert len(rows) == 4
    finished = {k: LOSS[k] for k in list(LOSS)[:3]}
    for key, row in rows.items():
        assert row["label"] == ", ".join(f"{k}={dict(steps=key[0], seconds=key[1])[k]}" for k in view["swept"])
        assert row["result"] == ({"loss": finished[key]} if key in finished else {})
        assert row["state"] == ("succeeded" if key in finished else "queued")
    ranking = {i["key"]: i["score"] for i in view["importance"]}
    assert math.isclose(ranking["steps"], _eta_squared(0, finished))
    assert math.isclose(ranking["seconds"], _eta_squared(1, finished))
    assert [i["key"] for i in view["importance"]] == ["steps", "seconds"]


def test_grids_overview_and_curves(client):
    grids = client.get("/api/v1/dashboard/grids").json()["grids"]
    assert [(g["name"], g["counts"]["succeeded"], g["workers"]) for g in grids] == [("dash", 3, [])]
    assert "spec" not in grids[0]
    job_ids = [r["job_id"] for r in client.get("/api/v1/dashboard/grids/dash").json()["rows"]]
    reply = client.get("/api/v1/dashboard/curves", params={"jobs": ",".join(map(str, job_ids)), "metric": "loss"})
    assert reply.json() == {"metric": "loss", "curves": [{"job_id": j, "steps": [], "values": []} for j in job_ids]}


@pytest.mark.parametrize("jobs,status,field", [("1,x", 422, "jobs"), ("99999999999", 422, "jobs"),
                                               ("2147483648", 422, "jobs"), (",".join(["1"] * 51), 422, "jobs"),
                                               ("424242", 404, None)])
def test_curves_bad_input(client, jobs, status, field):
    reply = client.get("/api/v1/dashboard/curves", params={"jobs": jobs})
    assert reply.status_code == status, reply.text
    if field:
        assert reply.json()["error"]["fields"][0]["field"] == field


def test_the_page_is_public_the_data_is_not(client):
    page = client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and "sign-in" in page.text and TOKEN not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert client.get("/dashboard/static/uPlot.LICENSE.txt").text.startswith("The MIT License")
    for path in ("/api/v1/dashboard/grids", "/api/v1/dashboard/grids/dash", "/api/v1/dashboard/curves?jobs=1"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer gf_wrong_wrong_wrong"}).status_code == 401


def test_swept_keys_and_labels():
    configs = [{"a": 1, "b": True, "c": "x"}, {"a": 2, "b": False, "c": "x"}, {"a": 2, "b": True}]
    assert views.swept_keys(configs) == ["a", "b", "c"]  # c is missing from one job: that differs too
    assert views.swept_keys(configs[:2]) == ["a", "b"]
    assert views.label({"state_size": 64, "use_forget_gate": False}, ["state_size", "use_forget_gate"]) == \
        "state_size=64, use_forget_gate=false"
    assert views.importance([{"config": {"a": 1}, "result": {"loss": 2.0}}], ["a"], "loss") == \
        [{"key": "a", "score": None}]


def test_every_static_file_is_package_data():
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    files = [p.relative_to(root / "api").as_posix() for p in (root / "api" / "dashboard" / "static").iterdir()]
    assert "dashboard/static/uPlot.iife.min.js" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
