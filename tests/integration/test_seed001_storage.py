"""Seed 001 on real databases (SQLite and Postgres): each job's external id (the seed's config id) stored and
searchable, imported results stored as done jobs that no worker claims, refined grids linked to their parent;
through the scheduler and through the real app in-process."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from common import schema as t
from scheduler import reports
from scheduler.grids import DoneJob, submit_grid
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.spec import GridError, GridSpec, expand
from tests.seed001_files import REAL_CONFIG, REAL_ID
from worker import trainers

BASE = {"steps": 10000, "batch_size": 256, "history": 1000, "steps_mode": "finish_window"}


def spec(name="s1", **fields) -> GridSpec:
    body = {"name": name, "trainer": "gated_rnn", "objective": "min:min_loss", "config": dict(BASE),
            "axes": {"n_layers": [1, 2], "state_size": [32, 256]}}
    body.update(fields)
    return GridSpec.model_validate(body)


def submit(engine, grid: GridSpec, done=None):
    return submit_grid(engine, grid, trainers.validate_config, external_id=trainers.external_id, done=done)


def rows(engine, grid_id):
    with engine.connect() as conn:
        return conn.execute(select(t.jobs).where(t.jobs.c.grid_id == grid_id).order_by(t.jobs.c.id)).mappings().all()


def done_for(grid: GridSpec, index: int, min_loss: float) -> DoneJob:
    job = expand(grid)[index]
    return DoneJob(config=job.config, seed=job.seed, result={"min_loss": min_loss, "dataset": "enwik8"},
                   started_at=100.0, finished_at=200.0)


def test_each_job_stores_the_seeds_config_id_and_is_found_by_it(engine):
    real = spec("real", config={**BASE, **REAL_CONFIG}, axes={})
    first, other = submit(engine, spec()), submit(engine, real)
    stored = rows(engine, first.grid_id)
    assert [r["external_id"] for r in stored] == [
        trainers.external_id("gated_rnn", r["config"]) for r in stored]
    assert len({r["external_id"] for r in stored}) == 4
    assert rows(engine, other.grid_id)[0]["external_id"] == REAL_ID
    found = reports.list_jobs(engine, external_id=REAL_ID)
    assert [(j["grid"], j["job_id"]) for j in found] == [("real", rows(engine, other.grid_id)[0]["id"])]
    # The same config in another grid (longer training) has the same seed id: both are found.
    again = submit(engine, spec("longer", config={**BASE, **REAL_CONFIG, "steps": 50000}, axes={}))
    assert [j["grid"] for j in reports.list_jobs(engine, external_id=REAL_ID)] == ["real", "longer"]
    assert [j["grid"] for j in reports.list_jobs(engine, external_id=REAL_ID, grid="longer")] == ["longer"]
    assert reports.list_jobs(engine, external_id="0" * 64) == []
    assert all(r["external_id"] == REAL_ID for r in reports.grid_results(engine, again.grid_id))
    columns, _ = reports.results_table(reports.grid_results(engine, again.grid_id))
    assert "external_id" in columns  # the CSV joins with the seed's results_01_all/<id>.json
    noop = submit_grid(engine, GridSpec.model_validate({"name": "n", "trainer": "noop"}), trainers.validate_config,
                       external_id=trainers.external_id)
    assert rows(engine, noop.grid_id)[0]["external_id"] is None


def test_imported_jobs_are_done_and_never_claimed(engine):
    grid = spec()
    result = submit(engine, grid, done=[done_for(grid, 0, 1.7), done_for(grid, 3, 1.9)])
    assert (result.created, result.imported, result.skipped) == (4, 2, [])
    stored = rows(engine, result.grid_id)
    assert [r["state"] for r in stored] == ["succeeded", "queued", "queued", "succeeded"]
    assert (stored[0]["result"], stored[0]["attempts"], stored[0]["started_at"], stored[0]["finished_at"]) == (
        {"min_loss": 1.7, "dataset": "enwik8"}, 0, 100.0, 200.0)
    queue = Queue(engine, RetryPolicy())
    claimed = {queue.claim("w").id, queue.claim("w").id}
    assert claimed == {stored[1]["id"], stored[2]["id"]} and queue.claim("w") is None
    summary = reports.grid_summary(engine, "s1")
    assert summary["counts"]["succeeded"] == 2 and summary["best"]["value"] == 1.7
    events = reports.job_events(engine, stored[0]["id"])
    assert [e["kind"] for e in events] == ["imported"]


def test_importing_twice_changes_nothing_and_a_job_that_ran_keeps_its_result(engine):
    grid = spec()
    first = submit(engine, grid)  # submitted before the import: all queued
    queue = Queue(engine, RetryPolicy())
    ran = queue.claim("w")
    queue.finish(ran.id, ran.attempt_id, "succeeded", result={"min_loss": 2.5}, worker_id=ran.worker_id)
    index = next(i for i, j in enumerate(expand(grid)) if j.key == rows(engine, first.grid_id)[0]["key"])
    other = next(i for i in range(4) if i != index)
    done = [done_for(grid, index, 1.1), done_for(grid, other, 1.2)]
    imported = submit(engine, grid, done=done)
    assert (imported.created, imported.imported) == (0, 1)
    assert [(s["job_id"], s["state"], s["attempts"]) for s in imported.skipped] == [(ran.id, "succeeded", 1)]
    assert "its own state and result are kept" in imported.skipped[0]["reason"]
    before = [dict(r) for r in rows(engine, first.grid_id)]
    assert next(r for r in before if r["id"] == ran.id)["result"] == {"min_loss": 2.5}
    again = submit(engine, grid, done=done)
    assert (again.created, again.imported, len(again.skipped)) == (0, 0, 1)
    assert [dict(r) for r in rows(engine, first.grid_id)] == before
    changed = submit(engine, grid, done=[done_for(grid, other, 9.9)])
    assert "imported before with another result" in changed.skipped[0]["reason"]


def test_a_done_job_must_be_one_of_the_grids(engine):
    grid = spec()
    stray = DoneJob(config={**BASE, "n_layers": 3}, seed=0, result={"min_loss": 1.0})
    with pytest.raises(GridError) as info:
        submit(engine, grid, done=[done_for(grid, 0, 1.0), stray])
    assert info.value.field == "done.1"
    assert reports.list_grids(engine) == []  # nothing written


def test_a_refined_grid_is_linked_to_its_parent(engine):
    submit(engine, spec())
    child = submit(engine, spec("s1-refined", parent="s1", axes={"n_layers": [3]}))
    with engine.connect() as conn:
        parent_id = conn.execute(select(t.grids.c.id).where(t.grids.c.name == "s1")).scalar_one()
        assert conn.execute(select(t.grids.c.parent_id).where(t.grids.c.id == child.grid_id)).scalar_one() == parent_id
    assert reports.grid_summary(engine, "s1-refined")["parent"] == {"id": parent_id, "name": "s1"}
    assert reports.grid_summary(engine, "s1")["children"] == [{"id": child.grid_id, "name": "s1-refined"}]
    assert reports.grid_summary(engine, "s1")["parent"] is None
    for name, parent, message in [("orphan", "nope", "no grid named 'nope'"), ("self", "self", "its own parent")]:
        with pytest.raises(GridError, match=message) as info:
            submit(engine, spec(name, parent=parent))
        assert info.value.field == "parent"


# ---- the same through the real app ----------------------------------------------------------------
@pytest.fixture
def api(db_url, engine):
    from starlette.testclient import TestClient

    from api.app import create_app
    from common.settings import Settings

    token = "adm-seed001-" + "x" * 20
    app = create_app(Settings(database_url=db_url, admin_token=token))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


def test_the_api_imports_finds_by_seed_id_and_shows_the_parent(api):
    grid = spec()
    body = {"grid": grid.model_dump(mode="json", exclude_defaults=True),
            "done": [{"config": d.config, "seed": d.seed, "result": d.result, "started_at": 5.0, "finished_at": 9.0}
                     for d in [done_for(grid, 1, 1.5)]]}
    reply = api.post("/api/v1/grids/import", json=body)
    assert reply.status_code == 201, reply.text
    assert {k: reply.json()[k] for k in ("created", "imported", "skipped")} == {"created": 4, "imported": 1,
                                                                                 "skipped": []}
    again = api.post("/api/v1/grids/import", json=body)
    assert again.status_code == 200 and (again.json()["created"], again.json()["imported"]) == (0, 0)
    wanted = trainers.external_id("gated_rnn", expand(grid)[1].config)
    for query in ({"external_id": wanted}, {"seed_config_id": wanted}, {"seed_config_id": wanted, "grid": "s1"}):
        jobs = api.get("/api/v1/jobs", params=query).json()["jobs"]
        assert [(j["external_id"], j["state"], j["result"]["min_loss"]) for j in jobs] == [(wanted, "succeeded", 1.5)]
    assert len(api.get("/api/v1/jobs", params={"grid": "s1", "state": "queued"}).json()["jobs"]) == 3
    assert api.get("/api/v1/jobs", params={"grid": "nope"}).status_code == 404
    assert api.get("/api/v1/jobs", params={"state": "done"}).status_code == 422
    clash = api.get("/api/v1/jobs", params={"external_id": "a", "seed_config_id": "b"})
    assert clash.status_code == 422 and "seed_config_id" in clash.text

    stray = {**body, "done": [{**body["done"][0], "config": {**BASE, "n_layers": 9}}]}
    bad = api.post("/api/v1/grids/import", json=stray)
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "done.0"
    child = {"name": "s1-big", "trainer": "gated_rnn", "parent": "s1", "config": {**BASE, "state_size": 512}}
    assert api.post("/api/v1/grids", json=child).status_code == 201
    view = api.get("/api/v1/grids/s1-big").json()
    assert view["parent"]["name"] == "s1" and view["spec"]["parent"] == "s1"
    orphan = api.post("/api/v1/grids", json={**child, "name": "x", "parent": "nope"})
    assert orphan.status_code == 422 and orphan.json()["error"]["fields"][0]["field"] == "parent"
    typo = api.post("/api/v1/grids", json={**child, "name": "y", "config": {**BASE, "state_sise": 512}})
    assert typo.status_code == 422 and typo.json()["error"]["fields"][0]["field"] == "config.state_sise"
