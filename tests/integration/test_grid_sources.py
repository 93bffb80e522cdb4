"""`gridfleet status`/`plots` read the same rows from the local database as from a server."""
from __future__ import annotations

from starlette.testclient import TestClient

from api.app import create_app
from common.settings import Settings
from cli.status_view import LocalGrids, RemoteGrids, SourceError
from scheduler.queue import Metric

TOKEN = "adm-sources-" + "x" * 20


def test_local_and_remote_sources_agree(db_url, queue):
    with TestClient(create_app(Settings(database_url=db_url, admin_token=TOKEN)),
                    headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        grid = {"name": "src", "trainer": "sleep", "objective": "min:loss", "axes": {"steps": [3, 4]}}
        assert api.post("/api/v1/grids", json=grid).status_code == 201
        worker = queue.register_worker(name="w", host="h", trainers=["sleep"], gpus=[], resources={})
        job = queue.claim(worker, trainers=["sleep"])
        queue.heartbeat(job.id, job.attempt_id, step=1, progress=(1, 3), worker_id=worker,
                        metrics=[Metric(1, {"loss": 0.9}), Metric(2, {"loss": 0.6})])
        queue.finish(job.id, job.attempt_id, "succeeded", result={"loss": 0.6}, worker_id=worker)

        remote = RemoteGrids(lambda path, params=None: api.get("/api/v1" + path, params=params).json())
        local = LocalGrids(db_url)
        try:
            for read in (lambda s: s.results("src"), lambda s: s.metrics(job.id), lambda s: s.grids(),
                         lambda s: s.summary("src")):
                assert read(local) == read(remote)
            assert [m["loss"] for m in local.metrics(job.id)] == [0.9, 0.6]
            try:
                local.summary("nope")
            except SourceError as exc:
                assert "nope" in str(exc)
            else:
                raise AssertionError("an unknown grid must be a SourceError")
        finally:
            local.close()


def test_a_missing_local_database_says_how_to_make_one(tmp_path):
    try:
        LocalGrids(f"sqlite:///{tmp_path / 'none.db'}")
    except SourceError as exc:
        assert "gridfleet run" in str(exc) and "--server" in str(exc)
    else:
        raise AssertionError("a missing database must be a SourceError")
    assert not (tmp_path / "none.db").exists()  # reading never creates it
