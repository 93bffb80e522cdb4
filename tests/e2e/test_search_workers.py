"""Searches with real processes (docs/searches.md): `gridfleet serve` on Postgres and four `gridfleet worker`
agents run two 40-trial TPE searches of the objective trainer's quadratic at once (two seeds), the API is
killed with SIGKILL mid-search and started again, and every search still ends with exactly 40 jobs, no
config run twice, each job run by one attempt, and a better best on average than 40 random trials (random
search over eight seeds, in memory here: it needs no workers to be random, and that halves the test).
`gridfleet run` (embedded, SQLite), stopped mid-search and run again, ends its search with exactly n_trials
jobs too, and `gridfleet status` shows it.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.processes import gridfleet_cmd, ok
from worker.trainers.objective import Config, value

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
                                reason="needs Linux /proc and POSIX process groups")

N_TRIALS = 40
SEEDS = (1, 2)  # TPE through the workers: 80 instant jobs
RANDOM_SEEDS = range(8)  # random search in memory: cheap, so more seeds for a steadier baseline
SPACE = {"x": {"type": "float", "low": -10, "high": 10}, "y": {"type": "float", "low": -10, "high": 10}}


def search_grid(name: str, sampler: str, seed: int) -> dict:
    return {"name": name, "trainer": "objective", "config": {"function": "quadratic"},
            "search": {"sampler": sampler, "n_trials": N_TRIALS, "seed": seed, "parallel": 4, "metric": "loss",
                       "space": SPACE}}


def searches_of(api, names):
    return {name: ok(api.get(f"/grids/{name}"))["search"] for name in names}


def random_search_bests() -> list[float]:
    """The baseline: 40 random trials of the same function and space per seed (Optuna's RandomSampler, in
    memory: random search needs no workers, and our `random` sampler is this one through the same loop as
    TPE, tests/integration/test_search.py)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial) -> float:
        return value(Config(function="quadratic", **{k: trial.suggest_float(k, p["low"], p["high"])
                                                     for k, p in SPACE.items()}))

    bests = []
    for seed in RANDOM_SEEDS:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        study.optimize(objective, n_trials=N_TRIALS)
        bests.append(study.best_value)
    return bests


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_tpe_by_four_workers_beats_random_through_an_api_restart(db_url, fleet, tmp_path):
    server = fleet.start_server(db_url)
    names = {seed: f"tpe-{seed}" for seed in SEEDS}
    first, *others = SEEDS
    assert ok(server.api.post("/grids", json=search_grid(names[first], "tpe", first)))["total"] == N_TRIALS
    for seed in others:  # the others as a user submits a file
        path = tmp_path / f"{names[seed]}.yaml"
        path.write_text(yaml.safe_dump(search_grid(names[seed], "tpe", seed)))
        submitted = subprocess.run([*gridfleet_cmd(), "submit", str(path), "--server", server.url],
                                   env=fleet.env(GRIDFLEET_TOKEN=server.admin_token), cwd=tmp_path,
                                   capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        assert f"grid {names[seed]}: a tpe search of {N_TRIALS} trials" in submitted.stdout, submitted.stdout
    for i in range(4):
        fleet.start_worker(server, f"w{i}")

    third = len(names) * N_TRIALS // 3
    fleet.wait_for(lambda: sum(s["done"] for s in searches_of(server.api, names.values()).values()) >= third,
                   "a third of all trials to be done")
    server.proc.send(signal.SIGKILL)  # mid-search: trials in flight, results untold, workers finishing
    assert server.proc.wait(30) == -signal.SIGKILL
    server = fleet.restart_server(server)
    random_bests = random_search_bests()  # while the workers finish the searches

    final = fleet.wait_for(
        lambda: (found := searches_of(server.api, names.values())) and
        all(s["state"] == "done" for s in found.values()) and found,
        "every search to finish after the restart", timeout=240)
    context = fleet.explain()
    for name in names.values():
        results = ok(server.api.get(f"/grids/{name}/results"))["results"]
        configs = {(r["config"]["x"], r["config"]["y"]) for r in results}
        assert len(results) == N_TRIALS and len(configs) == N_TRIALS, (name, len(results), len(configs), context)
        assert all(r["state"] == "succeeded" for r in results), (name, results)
        # Each trial ran once. A second attempt is allowed only after a first that never started: a claim
        # the server committed but whose answer died with it comes back when its lease ends, as `lost`.
        for r in results:
            if r["attempts"] > 1:
                events = ok(server.api.get(f"/jobs/{r['job_id']}/events"))["events"]
                ran = {e["attempt_id"] for e in events if e["attempt_id"] and e["kind"] != "lost"}
                assert len(ran) == 1, (name, r["job_id"], events)
        assert (final[name]["done"], final[name]["n_trials"]) == (N_TRIALS, N_TRIALS)
        assert final[name]["best"]["value"] == pytest.approx(min(r["result"]["loss"] for r in results))
    best = {"tpe": sum(final[names[seed]]["best"]["value"] for seed in SEEDS) / len(SEEDS),
            "random": sum(random_bests) / len(random_bests)}
    assert best["tpe"] < best["random"], (best, random_bests, {n: s["best"] for n, s in final.items()})
    fleet.assert_clean()


def test_gridfleet_run_stopped_mid_search_continues_to_its_end(tmp_path, fleet):
    """`gridfleet run` (SQLite, two local workers) is stopped with SIGTERM (as Ctrl-C) while trials run: the
    running trials are released as preempted; the same command again finishes the search with exactly
    n_trials jobs, each config succeeded once."""
    grid = search_grid("embedded", "tpe", 7)
    grid["config"]["seconds"] = 0.5  # long enough to stop it mid-trial
    grid["search"].update(n_trials=10, parallel=2, space={**SPACE, "kind": {"type": "categorical",
                                                                            "choices": ["flat", "bump"]}})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = fleet.env(GRIDFLEET_HOME=str(tmp_path / "home"))
    run = [*gridfleet_cmd(), "run", str(path), "--workers", "2"]
    first = fleet.spawn("run-1", run, env)
    database = tmp_path / "home" / "gridfleet.db"

    def succeeded() -> int:
        if not database.exists():
            return 0
        with sqlite3.connect(database) as conn:  # read-only peek; WAL lets it read beside the writers
            try:
                return conn.execute("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetchone()[0]
            except sqlite3.OperationalError:  # not migrated yet
                return 0

    fleet.wait_for(lambda: succeeded() >= 3 or not first.alive(), "three trials of the first run to finish")
    first.send(signal.SIGTERM)
    assert first.wait(120) == 3, first.tail()  # 3: not finished, run again to continue
    assert "not finished: run the same command again" in first.tail(200), first.tail(200)
    assert succeeded() < 10

    again = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a tpe search of 10 trials" in again.stdout
    assert "search: tpe: 10/10 trials done, 0 in flight (minimize loss, finished)" in again.stdout, again.stdout
    status = subprocess.run([*gridfleet_cmd(), "status", "embedded", "--json"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    out = json.loads(status.stdout)
    assert out["grid"]["search"]["done"] == 10 and len(out["results"]) == 10
    assert len({json.dumps(r["config"], sort_keys=True) for r in out["results"]}) == 10
    assert all(r["state"] == "succeeded" for r in out["results"])
    with sqlite3.connect(database) as conn:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM attempts GROUP BY outcome").fetchall())
    assert outcomes.get("succeeded") == 10 and set(outcomes) <= {"succeeded", "preempted"}, outcomes
