"""gridfleet workers as actors on a real local Ray cluster (CPU only, auth disabled), against a real
`gridfleet serve` process on Postgres: a fleet finishes a grid, a killed actor is restarted and its job
resumes from its checkpoint exactly once, and a drain leaves no job running and none lost."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray")

from tests.e2e.processes import Fleet, attempt_steps, job, ok, running_with  # noqa: E402
from worker.agent import AgentOptions  # noqa: E402
from worker.fleet import FleetError, FleetOptions, RayFleet, named_actors, worker_count  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    # Two logical GPUs: Ray schedules them and sets CUDA_VISIBLE_DEVICES even on a machine without any.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, namespace="gridfleet")
    yield
    ray.shutdown()


@contextmanager
def running_fleet(server, tmp_path, workers: int | None, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0):
    options = FleetOptions(server_url=server.url, token=server.worker_token, workers=workers,
                           gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                           agent=AgentOptions(home=tmp_path / "fleet-home", grace_seconds=20.0))
    ray_fleet = RayFleet(options).start()
    stop = threading.Event()
    supervisor = threading.Thread(target=ray_fleet.supervise, args=(stop,), daemon=True)
    supervisor.start()
    try:
        yield ray_fleet, stop, supervisor
    finally:
        stop.set()
        supervisor.join(timeout=30)
        if not ray_fleet.draining.is_set():
            ray_fleet.drain(timeout=30)


def submit_grid(api, name: str, config: dict, trainer: str = "sleep", **spec) -> list[int]:
    ok(api.post("/grids", json={"name": name, "trainer": trainer, "config": config, **spec}))
    return [row["job_id"] for row in ok(api.get(f"/grids/{name}/results"))["results"]]


def test_worker_count_for_auto_and_fixed_fleets():
    assert worker_count(3, 1.0, cluster_gpus=0) == 3
    assert worker_count(None, 0.25, cluster_gpus=2) == 8  # fractions pack small jobs onto one GPU
    assert worker_count(None, 1.0, cluster_gpus=3.5) == 3
    with pytest.raises(FleetError, match="gpus-per-worker"):
        worker_count(None, 0.0, cluster_gpus=4)
    with pytest.raises(FleetError, match="not enough for one worker"):
        worker_count(None, 1.0, cluster_gpus=0)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_fleet_of_two_actors_finishes_a_grid_of_six_jobs(db_url, fleet: Fleet, ray_cluster, tmp_path):
    server = fleet.start_server(db_url)
    ids = submit_grid(server.api, "ray-six", {"seconds": 0.5, "steps": 2}, axes={"steps": [2, 3, 4, 5, 6, 7]})
    assert len(ids) == 6
    with running_fleet(server, tmp_path, workers=2) as (ray_fleet, _, _):
        fleet.wait_for(lambda: all(job(server.api, i)["state"] == "succeeded" for i in ids),
                       "the fleet to finish all six jobs")
        infos = ray_fleet.status()
        assert [i["index"] for i in infos] == [0, 1] and all(i["worker_id"] for i in infos), infos
        assert sum(i["jobs_done"] for i in infos) == 6, infos
        assert {i["name"] for i in infos} == {"fleet-0", "fleet-1"}
        assert len(named_actors()) == 2  # what `gridfleet fleet status` lists
    for job_id in ids:
        detail = job(server.api, job_id)
        assert detail["attempts"] == 1 and detail["errors"] == 0, detail
        assert detail["attempt_history"][0]["worker_id"] in {i["worker_id"] for i in infos}
    fleet.assert_clean()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_killed_actor_is_restarted_and_its_job_resumes_from_its_checkpoint_once(db_url, fleet: Fleet,
                                                                                 ray_cluster, tmp_path):
    server = fleet.start_server(db_url)
    steps = 30
    [job_id] = submit_grid(server.api, "ray-kill", {"seconds": 6.0, "steps": steps, "checkpoint_every": 1})
    with running_fleet(server, tmp_path, workers=1) as (ray_fleet, _, _):
        before = fleet.wait_for(lambda: running_with(server.api, job_id, 3, checkpointed=True),
                                "the actor's job to run and checkpoint step 3")
        [info] = ray_fleet.status()
        assert info["job_id"] == job_id, info
        os.kill(info["pid"], signal.SIGKILL)  # the actor process; its job child dies with it (PDEATHSIG)

        done = fleet.wait_for(lambda: (d := job(server.api, job_id))["state"] not in ("queued", "running") and d,
                              "the restarted actor to resume the job and finish it")
        assert ray_fleet.restarts == 1
        [after] = ray_fleet.status()
        assert after["pid"] != info["pid"] and after["worker_id"] != info["worker_id"], (info, after)
    context = f"\njob: {done}\n{fleet.explain()}"
    assert done["state"] == "succeeded" and done["result"] == {"loss": 1.0 / steps, "steps": steps}, context
    first, second = done["attempt_history"]
    assert (first["outcome"], second["outcome"]) == ("lost", "succeeded"), context
    resumed = attempt_steps(server.api, job_id, second["id"])
    assert resumed and resumed[0] >= before["checkpoint"]["step"] + 1, (resumed, context)
    assert resumed == list(range(resumed[0], steps + 1)), (resumed, context)
    kinds = [e["kind"] for e in ok(server.api.get(f"/jobs/{job_id}/events"))["events"]]
    assert kinds.count("succeeded") == 1, kinds


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_drain_checkpoints_and_releases_every_running_job(db_url, fleet: Fleet, ray_cluster, tmp_path):
    server = fleet.start_server(db_url)
    ids = submit_grid(server.api, "ray-drain", {"seconds": 60.0, "steps": 600, "checkpoint_every": 1000},
                      axes={"steps": [600, 601]})
    with running_fleet(server, tmp_path, workers=2) as (ray_fleet, stop, supervisor):
        for job_id in ids:
            fleet.wait_for(lambda: running_with(server.api, job_id, 2, checkpointed=False),
                           f"job {job_id} to run")
        stop.set()
        supervisor.join(timeout=30)
        started = time.monotonic()
        assert ray_fleet.drain(timeout=60), fleet.explain()
        drained_in = time.monotonic() - started
    for job_id in ids:
        detail = job(server.api, job_id)
        # Released, not lost: back in the queue with the checkpoint written on the way out.
        assert detail["state"] == "queued" and detail["preemptions"] == 1 and detail["losses"] == 0, detail
        assert detail["checkpoint"] and detail["checkpoint"]["step"] >= 2, detail
        assert detail["attempt_history"][-1]["outcome"] == "preempted", detail
    assert drained_in < 30, drained_in  # within the grace period, not by the lease running out
    assert not named_actors()


SHOW_GPU = "import os, gridfleet_script_api as gf; gf.result(cuda=os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_auto_fills_the_gpus_and_each_job_sees_only_its_actors_gpu(db_url, fleet: Fleet, ray_cluster, tmp_path):
    server = fleet.start_server(db_url)
    ids = submit_grid(server.api, "ray-gpus", {"command": [sys.executable, "-c", SHOW_GPU]},
                      axes={"config.i": [0, 1, 2, 3]}, trainer="command", resources={"gpus": 1})
    [too_big] = submit_grid(server.api, "ray-too-big", {"seconds": 0.1}, resources={"gpus": 2})
    with running_fleet(server, tmp_path, workers=None, gpus_per_worker=1.0, cpus_per_worker=0.5) as (ray_fleet, _, _):
        fleet.wait_for(lambda: all(job(server.api, i)["state"] == "succeeded" for i in ids),
                       "the GPU jobs to finish")
        infos = ray_fleet.status()
    assert len(infos) == 2  # auto: the cluster's 2 GPUs / 1 GPU per worker
    assert sorted(i["cuda_visible_devices"] for i in infos) == ["0", "1"], infos
    gpu_of_worker = {i["worker_id"]: i["cuda_visible_devices"] for i in infos}
    for job_id in ids:
        detail = job(server.api, job_id)
        assert detail["result"]["cuda"] == gpu_of_worker[detail["attempt_history"][0]["worker_id"]], detail
    # A job asking for more than a worker's share is never claimed by it.
    assert job(server.api, too_big)["state"] == "queued"
