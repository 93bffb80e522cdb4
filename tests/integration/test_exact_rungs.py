"""Exact rung stops (docs/early_stopping.md): under an ASHA rule a job's child waits at each rung step for
the verdict of a heartbeat its agent sends at once, so a pruned job stops AT its rung, not at the next
regular beat. A real Agent in a thread of this process, real job children (forked warm, or spawned cold),
solo and as a gang, on SQLite and Postgres; and a verdict that never comes (a scheduler too slow to answer,
or one that cannot be reached) leaves the job training on to its end.

The heartbeat interval (2 s) is far longer than a job (54 steps of 10 ms): without the wait every pruned
job would train to its end, or far past its rung, before its next beat.
"""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from common import schema as t
from scheduler.grids import submit_grid
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.spec import GridSpec
from worker.agent import Agent
from worker.client import DirectClient, ServerUnavailable
from worker.trainers import curve, fuse_key, validate_config

DEADLINE = 300.0  # generous: a loaded 2-core machine makes these slower, never wrong
STEPS, MIN_STEPS, ETA = 54, 2, 3  # rungs at steps 2, 6 and 18; 54 is the end (max_resource)
RUNGS = (2, 6, 18)
HEARTBEAT_SECONDS = 2.0
XS = [round(0.3 + d, 6) for d in (0.8, 0.1, 0.5, 0.0, 0.7, 0.3, 1.0, 0.2, 0.6)]


@pytest.fixture
def fast_queue(engine):
    return Queue(engine, RetryPolicy(lease_seconds=30.0, backoff_base_seconds=0.05))


def _grid(engine, name: str, xs: list[float], rule: str = "asha", **config) -> list[int]:
    spec = GridSpec.model_validate({
        "name": name, "trainer": "curve", "objective": "min:loss", "axes": {"x": xs},
        "config": {"steps": STEPS, "step_seconds": 0.01, "checkpoint_every": 1000, **config},
        "prune": {"rule": rule, "min_steps": MIN_STEPS, "reduction_factor": ETA, "max_resource": STEPS}})
    grid_id = submit_grid(engine, spec, validate_config, fuse_key=fuse_key).grid_id
    with engine.connect() as conn:
        return list(conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid_id).order_by(t.jobs.c.id))
                    .scalars())


def _wait_ended(engine, ids: list[int]) -> dict[int, dict]:
    deadline = time.monotonic() + DEADLINE
    while True:
        with engine.connect() as conn:
            jobs = {r["id"]: dict(r) for r in conn.execute(select(t.jobs).where(t.jobs.c.id.in_(ids))).mappings()}
        if all(j["state"] not in ("queued", "running") for j in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, f"timed out waiting for the jobs to end: {jobs}"
        time.sleep(0.05)


def _metric_steps(engine, job_id: int) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(t.metrics.c.step).where(t.metrics.c.job_id == job_id)).scalars())


def _assert_stopped_at_rungs(engine, jobs: dict[int, dict], rule: str = "asha") -> None:
    with engine.connect() as conn:
        decisions = conn.execute(select(t.prune_rungs).order_by(t.prune_rungs.c.id)).all()
    stopped = {d.job_id: d for d in decisions if not d.promoted}
    pruned = {i for i, j in jobs.items() if j["state"] == "pruned"}
    assert stopped and pruned == set(stopped), (jobs, decisions)
    for i in pruned:
        job, rung = jobs[i], stopped[i]
        # asha: rung k's step; hyperband: rung k of the job's bracket (tests/integration/test_hyperband.py)
        assert rung.step == RUNGS[rung.rung] if rule == "asha" else rung.step in RUNGS, rung
        assert job["pruned_step"] == rung.step, (job, rung)
        # Not one step past it: the last step it reported, every metric it stored and its checkpoint.
        assert job["step"] == rung.step, (job, rung)
        assert _metric_steps(engine, i) == list(range(1, rung.step + 1)), job
        assert job["checkpoint"]["step"] == rung.step, job
    for i in set(jobs) - pruned:
        assert jobs[i]["state"] == "succeeded" and jobs[i]["step"] == STEPS, jobs[i]
    best = min(jobs, key=lambda i: curve.final(curve.Config.model_validate(jobs[i]["config"])))
    assert jobs[best]["state"] == "succeeded", jobs


def test_solo_jobs_pruned_by_asha_stop_at_their_rung_step(db_url, engine, fast_queue, tmp_path, start_agent):
    _solo_jobs_stop_at_their_rung_step(engine, fast_queue, tmp_path, start_agent, warm=True)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the cold start reads verdicts as the warm one does
def test_cold_started_jobs_pruned_by_asha_stop_at_their_rung_step(db_url, engine, fast_queue, tmp_path, start_agent):
    _solo_jobs_stop_at_their_rung_step(engine, fast_queue, tmp_path, start_agent, warm=False)


def _solo_jobs_stop_at_their_rung_step(engine, fast_queue, tmp_path, start_agent, warm: bool) -> None:
    ids = _grid(engine, "exact", XS)
    start_agent(DirectClient(fast_queue, heartbeat_seconds=HEARTBEAT_SECONDS), tmp_path / "w1", ["curve"], warm=warm)
    _assert_stopped_at_rungs(engine, _wait_ended(engine, ids))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_solo_jobs_pruned_by_hyperband_stop_at_their_bracket_rung_step(db_url, engine, fast_queue, tmp_path,
                                                                        start_agent):
    ids = _grid(engine, "exact-hb", XS + [round(x + 0.05, 6) for x in XS], rule="hyperband")
    start_agent(DirectClient(fast_queue, heartbeat_seconds=HEARTBEAT_SECONDS), tmp_path / "w1", ["curve"])
    _assert_stopped_at_rungs(engine, _wait_ended(engine, ids), rule="hyperband")


def test_gang_members_pruned_by_asha_stop_at_their_rung_step(db_url, engine, fast_queue, tmp_path, start_agent):
    ids = _grid(engine, "exact-gang", XS[:6], fuse_group="g")
    start_agent(DirectClient(fast_queue, heartbeat_seconds=HEARTBEAT_SECONDS, max_gang_jobs=64), tmp_path / "w1",
                ["curve"], max_gang=6)
    jobs = _wait_ended(engine, ids)
    _assert_stopped_at_rungs(engine, jobs)
    assert [p.name for p in (tmp_path / "w1" / "work").glob("gang-*")] == [f"gang-{ids[0]}"]  # one gang


class AwayAtRungs(DirectClient):
    """A scheduler whose heartbeats for a job do not answer while its child trains: each one either hangs
    (`hang`: until the job's result reached the agent, or 60 s) or fails as an unreachable server."""

    def __init__(self, queue, hang: bool):
        super().__init__(queue, heartbeat_seconds=HEARTBEAT_SECONDS)
        self.hang = hang
        self.agent: Agent | None = None
        self.released_by_result = threading.Event()

    def _result_arrived(self) -> bool:
        run = self.agent.current if self.agent is not None else None
        return run is None or run.result is not None

    def heartbeat(self, worker_id: str, job_id=None, **body):
        if job_id is not None and not self._result_arrived():
            if not self.hang:
                raise ServerUnavailable("POST heartbeat: cannot reach the server (test)")
            deadline = time.monotonic() + 60.0
            while not self._result_arrived() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._result_arrived():
                self.released_by_result.set()
        return super().heartbeat(worker_id, job_id=job_id, **body)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("hang", [True, False], ids=["slow", "unreachable"])
def test_a_verdict_that_never_comes_leaves_the_job_training_to_its_end(db_url, engine, fast_queue, tmp_path,
                                                                       start_agent, hang):
    ids = _grid(engine, "no-verdict", [0.3])
    client = AwayAtRungs(fast_queue, hang)
    running = start_agent(client, tmp_path / "w1", ["curve"])
    client.agent = running.agent
    jobs = _wait_ended(engine, ids)
    job = jobs[ids[0]]
    assert job["state"] == "succeeded" and job["step"] == STEPS, job
    assert _metric_steps(engine, ids[0]) == list(range(1, STEPS + 1))  # kept while away, sent afterwards
    if hang:  # the hung beat ended because the child went on to its result, not by its own time limit
        assert client.released_by_result.is_set()
