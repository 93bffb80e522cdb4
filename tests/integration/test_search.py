"""Searches (scheduler/search.py) on real SQLite and Postgres: a trial's config becomes a job, results go back
to the sampler, never more than n_trials jobs, a config suggested twice runs once, a crash between ask and
store loses no trial, processes racing to ask stay within n_trials, and bad specs are a 422 naming the field.

Jobs are run here by the test itself (claim, compute the objective trainer's value, finish): the search
only sees the queue, so this is what a worker does, minus the process (tests/e2e/test_search_workers.py has
real worker processes and an API restart).
"""
from __future__ import annotations

import multiprocessing as mp
import secrets
import time
import traceback
from collections import Counter

import optuna
import pytest
from sqlalchemy import func, select, update

from common import schema as t
from common.db import make_engine
from scheduler.grids import cancel_grid, submit_grid
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.reports import grid_summary
from scheduler.search import Searches, study_name
from scheduler.spec import GridSpec, expand
from worker.trainers import external_id, fuse_key, validate_config
from worker.trainers.objective import Config, value

XY = {"x": {"type": "float", "low": -10, "high": 10}, "y": {"type": "float", "low": -10, "high": 10}}
SPAWN = mp.get_context("spawn")


def search_grid(name="s", n_trials=12, **search):
    return GridSpec(name=name, trainer="objective",
                    search={"n_trials": n_trials, "metric": "loss", "space": XY, "parallel": 3, **search})


def run_one(queue: Queue, searches: Searches, worker_id: str, outcome_for=None) -> bool:
    """Claim a job and finish it as a worker would (then the finish hook); False when none was queued."""
    job = queue.claim(worker_id)
    if job is None:
        return False
    outcome = outcome_for(job) if outcome_for else "succeeded"
    result = {"loss": value(Config(**job.config))} if outcome == "succeeded" else None
    assert queue.finish(job.id, job.attempt_id, outcome, result=result, error="boom", worker_id=worker_id).ok
    searches.after_finish([job.id])
    return True


def run_search(engine, grid_id: int, searches: Searches, outcome_for=None, limit=500) -> None:
    queue = Queue(engine, RetryPolicy(lease_seconds=60.0, backoff_base_seconds=0.0))
    worker_id = queue.register_worker("w", "h", ["objective"])
    for _ in range(limit):
        if not run_one(queue, searches, worker_id, outcome_for):
            searches.advance(grid_id)
            if search_state(engine, grid_id) == "done":
                return
    raise AssertionError("the search did not finish")


def search_state(engine, grid_id: int) -> str:
    with engine.connect() as conn:
        return conn.execute(select(t.searches.c.state).where(t.searches.c.grid_id == grid_id)).scalar()


def jobs_of(engine, grid_id: int):
    with engine.connect() as conn:
        return conn.execute(select(t.jobs.c.id, t.jobs.c.key, t.jobs.c.state, t.jobs.c.config, t.jobs.c.attempts,
                                   t.jobs.c.result).where(t.jobs.c.grid_id == grid_id)).all()


def trials_of(engine, grid_id: int):
    with engine.connect() as conn:
        return conn.execute(select(t.search_trials).where(t.search_trials.c.grid_id == grid_id)
                            .order_by(t.search_trials.c.number)).all()


def test_a_search_runs_exactly_n_trials_and_tells_every_result(engine):
    spec = search_grid(n_trials=12)
    submitted = submit_grid(engine, spec, validate_config)
    assert (submitted.created, submitted.total) == (0, 12)  # jobs come from the sampler, not from the POST
    searches = Searches(engine, external_id, fuse_key)
    assert searches.advance(submitted.grid_id)
    assert len(jobs_of(engine, submitted.grid_id)) == 3  # `parallel` trials in flight, no more
    run_search(engine, submitted.grid_id, searches)

    jobs = jobs_of(engine, submitted.grid_id)
    assert len(jobs) == 12 and len({j.key for j in jobs}) == 12
    assert all(j.state == "succeeded" and j.attempts == 1 for j in jobs)
    trials = trials_of(engine, submitted.grid_id)
    assert {tr.told for tr in trials} == {"COMPLETE"} and len({tr.job_id for tr in trials}) == 12
    by_job = {j.id: j.result["loss"] for j in jobs}
    assert all(tr.value == pytest.approx(by_job[tr.job_id]) for tr in trials)

    # Optuna's study holds the same trials and values, and agrees on the best.
    with engine.connect() as conn:
        created = conn.execute(select(t.grids.c.created_at).where(t.grids.c.id == submitted.grid_id)).scalar()
    point = expand(spec)[0]
    study = optuna.load_study(study_name=study_name(submitted.grid_id, created, point.key),
                              storage=searches.storage())
    assert len(study.trials) == 12 and all(tr.state.name == "COMPLETE" for tr in study.trials)
    summary = grid_summary(engine, submitted.grid_id)["search"]
    assert summary["best"]["value"] == pytest.approx(study.best_value) == pytest.approx(min(by_job.values()))
    assert (summary["done"], summary["n_trials"], summary["in_flight"], summary["state"]) == (12, 12, 0, "done")
    assert summary["best"]["params"] == {k: pytest.approx(v) for k, v in study.best_params.items()}
    assert grid_summary(engine, submitted.grid_id)["progress"] == 1.0


def test_a_config_suggested_twice_runs_once(engine):
    """A space of 6 configs and 6 trials: random sampling suggests some twice; each config runs once and
    every duplicate trial is told its job's result."""
    spec = GridSpec(name="small", trainer="objective", search={
        "sampler": "random", "n_trials": 6, "metric": "loss", "parallel": 2, "seed": 3,
        "space": {"level": {"type": "int", "low": 0, "high": 2}, "kind": {"type": "categorical",
                                                                          "choices": ["flat", "bump"]}}})
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    searches = Searches(engine)
    run_search(engine, grid_id, searches)
    jobs = jobs_of(engine, grid_id)
    configs = Counter((j.config["level"], j.config["kind"]) for j in jobs)
    assert len(jobs) == 6 and set(configs.values()) == {1}
    assert all(j.attempts == 1 for j in jobs)
    trials = trials_of(engine, grid_id)
    duplicates = [tr for tr in trials if tr.duplicate]
    assert duplicates, "random sampling over 6 configs should have suggested one twice"
    assert all(tr.told == "COMPLETE" for tr in trials)
    results = {j.id: j.result["loss"] for j in jobs}
    assert all(tr.value == pytest.approx(results[tr.job_id]) for tr in duplicates)


def test_the_grid_sampler_covers_its_space(engine):
    spec = GridSpec(name="g", trainer="objective", search={
        "sampler": "grid", "n_trials": 6, "metric": "loss",
        "space": {"x": {"type": "float", "low": 0, "high": 2, "step": 1}, "kind": {"type": "categorical",
                                                                                    "choices": ["flat", "bump"]}}})
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    run_search(engine, grid_id, Searches(engine))
    assert sorted((j.config["x"], j.config["kind"]) for j in jobs_of(engine, grid_id)) == \
        sorted((x, k) for x in (0.0, 1.0, 2.0) for k in ("bump", "flat"))


def test_failed_jobs_are_told_fail_and_count_as_trials(engine):
    spec = search_grid(name="f", n_trials=6, sampler="random")
    grid_id = submit_grid(engine, spec.model_copy(update={"max_attempts": 1}), validate_config).grid_id
    run_search(engine, grid_id, Searches(engine), outcome_for=lambda job: "error" if job.config["x"] < 0 else
               "succeeded")
    jobs = jobs_of(engine, grid_id)
    assert len(jobs) == 6
    told = {tr.job_id: tr.told for tr in trials_of(engine, grid_id)}
    assert all(told[j.id] == ("FAIL" if j.state == "failed" else "COMPLETE") for j in jobs)


def test_axes_beside_a_search_give_each_point_its_own_search(engine):
    spec = GridSpec(name="ax", trainer="objective", axes={"function": ["quadratic", "branin"]},
                    search={"n_trials": 4, "metric": "loss", "parallel": 2, "sampler": "random", "space": XY})
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    run_search(engine, grid_id, Searches(engine))
    jobs = jobs_of(engine, grid_id)
    assert Counter(j.config["function"] for j in jobs) == {"quadratic": 4, "branin": 4}
    summary = grid_summary(engine, grid_id)["search"]
    assert (summary["done"], summary["n_trials"]) == (8, 8)


def test_a_trial_asked_but_never_stored_gets_its_job(engine):
    """The asker died between Optuna's ask and our store: the next advance adopts the trial; n_trials holds."""
    spec = search_grid(name="crash", n_trials=4, sampler="random")
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    searches = Searches(engine)
    with engine.connect() as conn:
        created = conn.execute(select(t.grids.c.created_at).where(t.grids.c.id == grid_id)).scalar()
    study = optuna.create_study(study_name=study_name(grid_id, created, expand(spec)[0].key),
                                storage=searches.storage(), load_if_exists=True)
    from scheduler.search import _distributions

    orphan = study.ask(_distributions(spec.search))  # asked, and the process "died" before storing it
    searches.advance(grid_id)
    jobs = jobs_of(engine, grid_id)
    assert any(j.config["x"] == orphan.params["x"] and j.config["y"] == orphan.params["y"] for j in jobs)
    run_search(engine, grid_id, searches)
    assert len(jobs_of(engine, grid_id)) == 4
    assert all(tr.state.name == "COMPLETE" for tr in study.get_trials())


def test_a_live_holder_makes_others_wait_and_wakes_it_a_dead_one_does_not(engine):
    """SQLite: the lease decides; a dead holder's lease must run out. Postgres: the holder's session advisory
    lock decides; a holder whose connection died (an API killed with SIGKILL) leaves it at once."""
    from sqlalchemy import text

    from scheduler.search import ADVISORY_SPACE

    spec = search_grid(name="lease", n_trials=5, sampler="random")
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    with engine.begin() as conn:  # another process holds the asking lease
        conn.execute(update(t.searches).values(lock_owner="other", lock_until=9e12))
    holder = None
    if engine.dialect.name == "postgresql":  # ... and, being alive, its advisory lock
        holder = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        assert holder.execute(text("SELECT pg_try_advisory_lock(:s, :g)"), {"s": ADVISORY_SPACE, "g": grid_id}).scalar()
    searches = Searches(engine)
    assert searches.advance(grid_id) is False
    assert jobs_of(engine, grid_id) == []
    with engine.connect() as conn:
        assert conn.execute(select(t.searches.c.wake)).scalar() == 1  # the holder looks again before it lets go
    if holder is not None:
        holder.invalidate()  # the holder dies: its connection goes, and the server drops its lock
        holder.close()
        _wait_until_the_server_drops_the_lock(engine, ADVISORY_SPACE, grid_id)
    else:
        with engine.begin() as conn:  # the holder dies: on SQLite its lease has to run out
            conn.execute(update(t.searches).values(lock_until=0.0))
    assert searches.advance(grid_id) is True
    assert len(jobs_of(engine, grid_id)) == 3


def _wait_until_the_server_drops_the_lock(engine, space: int, key: int, within_s: float = 60.0) -> None:
    """A closed connection's backend exits, and lets its locks go, a moment later: on a loaded machine
    later than our next statement."""
    from sqlalchemy import text

    held = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid::bigint = :s AND objid::bigint = :g AND objsubid = 2")
    deadline = time.monotonic() + within_s
    with engine.connect() as conn:
        while conn.execute(held, {"s": space, "g": key}).scalar():
            assert time.monotonic() < deadline, f"the server kept the dead holder's lock for {within_s} s"
            conn.rollback()
            time.sleep(0.02)


def test_cancelling_a_search_grid_ends_its_search(engine):
    spec = search_grid(name="c", n_trials=10)
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    searches = Searches(engine)
    searches.advance(grid_id)
    cancel_grid(engine, grid_id)
    searches.advance(grid_id)
    assert search_state(engine, grid_id) == "done"
    assert {tr.told for tr in trials_of(engine, grid_id)} == {"FAIL"}
    assert len(jobs_of(engine, grid_id)) == 3


# ---- processes racing ---------------------------------------------------------------------------------
def _racer(db_url: str, grid_id: int, barrier, results) -> None:
    """Run trials and advance the search until it is done; report the jobs this process finished."""
    try:
        engine = make_engine(db_url)
        queue = Queue(engine, RetryPolicy(lease_seconds=60.0))
        searches = Searches(engine)
        worker_id = queue.register_worker("racer", "h", ["objective"])
        barrier.wait(timeout=120)
        finished = 0
        for _ in range(400):
            if run_one(queue, searches, worker_id):  # its finish hook asks: three processes race to ask
                finished += 1
                continue
            searches.advance(grid_id)
            if search_state(engine, grid_id) == "done":
                break
        results.put(("ok", finished))
        engine.dispose()
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put(("error", traceback.format_exc()))


def test_processes_racing_to_ask_never_exceed_n_trials(db_url, engine):
    spec = search_grid(name="race", n_trials=12, sampler="tpe", parallel=4)
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    barrier, results = SPAWN.Barrier(3), SPAWN.Queue()
    procs = [SPAWN.Process(target=_racer, args=(db_url, grid_id, barrier, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    jobs = jobs_of(engine, grid_id)
    assert len(jobs) == 12 and len({j.key for j in jobs}) == 12
    assert all(j.state == "succeeded" and j.attempts == 1 for j in jobs)
    assert sum(n for _, n in outcomes) == 12
    with engine.connect() as conn:
        attempts = conn.execute(select(func.count()).select_from(t.attempts)).scalar()
    assert attempts == 12


# ---- bad specs at POST ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(tmp_path_factory):
    """The app in-process on SQLite (validation happens before any database work), one for the module."""
    from starlette.testclient import TestClient  # here: the racing processes import this module, not the app

    from api.app import create_app
    from common.settings import Settings

    token = "gf_search_admin_" + secrets.token_hex(16)
    url = f"sqlite:///{tmp_path_factory.mktemp('search-api') / 'gridfleet.db'}"
    app = create_app(Settings(database_url=url, admin_token=token, search_interval=0.0))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client
    app.state.queue.close()
    app.state.searches.close()


BAD = [
    ({"space": {"x": {"type": "float", "low": 3, "high": 1}}}, "search.space.x", "low <= high"),
    ({"space": {"x": {"type": "float", "low": 0, "high": 1, "log": True}}}, "search.space.x", "0 < low"),
    ({"space": {"level": {"type": "int", "low": 0.5, "high": 3}}}, "search.space.level", "whole"),
    ({"space": {"kind": {"type": "categorical", "choices": []}}}, "search.space.kind", "choices"),
    ({"space": {"x": {"type": "normal"}}}, "search.space.x.type", ""),
    ({"sampler": "annealing"}, "search.sampler", ""),
    ({"n_trials": 0}, "search.n_trials", ""),
    ({"sampler": "grid"}, "search", "space.x: the grid sampler needs finitely many values"),
    ({"sampler": "cmaes", "space": {"kind": {"type": "categorical", "choices": ["flat", "bump"]}}}, "search",
     "cmaes"),
    ({"n_trials": 7, "space": {"level": {"type": "int", "low": 0, "high": 2}}}, "search", "only 3 distinct"),
    ({"metric": None}, "search", "metric"),
    ({"space": {"x": {"type": "float", "low": 0, "high": 2000000}}}, "config.x", ""),  # the trainer's own bound
    ({"space": {**XY, "kind": {"type": "categorical", "choices": ["flat", "spiky"]}}}, "config.kind", ""),
    ({"space": {"lr": {"type": "float", "low": 0, "high": 1}}}, "config.lr", ""),  # not a key of the Config
]


@pytest.mark.parametrize("change,field,words", BAD, ids=[b[1] + ":" + (b[2] or "type") for b in BAD])
def test_a_bad_search_spec_is_a_422_naming_the_field(http, change, field, words):
    search = {"n_trials": 5, "metric": "loss", "space": XY, **change}
    search = {k: v for k, v in search.items() if v is not None}
    reply = http.post("/api/v1/grids", json={"name": "bad", "trainer": "objective", "search": search})
    assert reply.status_code == 422, reply.text
    fields = reply.json()["error"]["fields"]
    assert any(f["field"] == field and words in f["message"] for f in fields), fields
    assert "bad" not in [g["name"] for g in http.get("/api/v1/grids").json()["grids"]]


def test_a_key_both_swept_and_searched_is_a_422(http):
    reply = http.post("/api/v1/grids", json={"name": "bad", "trainer": "objective", "axes": {"x": [1, 2]},
                                             "search": {"n_trials": 5, "metric": "loss", "space": XY}})
    assert reply.status_code == 422
    assert any(f["field"] == "search" and "space.x" in f["message"] for f in reply.json()["error"]["fields"])


def test_the_api_shows_a_search_and_asks_its_first_trials_at_post(http):
    reply = http.post("/api/v1/grids", json={"name": "ok", "trainer": "objective",
                                             "search": {"n_trials": 8, "parallel": 2, "metric": "loss",
                                                        "space": XY}})
    assert reply.status_code == 201 and reply.json()["total"] == 8
    grid = http.get("/api/v1/grids/ok").json()
    assert grid["objective"] == "min:loss"
    assert {k: grid["search"][k] for k in ("sampler", "n_trials", "trials", "done", "in_flight", "state")} == \
        {"sampler": "tpe", "n_trials": 8, "trials": 2, "done": 0, "in_flight": 2, "state": "running"}
    assert grid["counts"]["queued"] == 2 and grid["progress"] == 0.0
    listed = {g["name"]: g for g in http.get("/api/v1/grids").json()["grids"]}
    assert listed["ok"]["search"]["n_trials"] == 8
