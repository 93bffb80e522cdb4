"""Seed 001 as its users would move over: `gridfleet import` of their rnn_configs.json and results_01_all,
`gridfleet status --seed-config-id`, and `gridfleet refine` for the next stage, against a real `gridfleet
serve` on SQLite and Postgres (the `fleet` and `db_url` fixtures of tests/conftest.py)."""
from __future__ import annotations

import json
import subprocess

import yaml

from tests.e2e.processes import Fleet, gridfleet_cmd, ok
from tests.seed001_files import seed_configs, write_configs, write_result

GRID = {"name": "seed-e2e", "trainer": "gated_rnn", "objective": "min:min_loss",
        "config": {"batch_size": 256, "history": 1000, "steps": 10000, "steps_mode": "finish_window",
                   "corpus": "/data/enwik8.txt", "log_every": 50}}


def test_import_then_find_then_refine(db_url, fleet: Fleet):
    server = fleet.start_server(db_url)
    tmp = fleet.tmp
    env = fleet.env(GRIDFLEET_SERVER_URL=server.url, GRIDFLEET_TOKEN=server.admin_token)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*gridfleet_cmd(), *args], env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=180)

    grid_file = tmp / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(GRID))
    configs = seed_configs()
    write_configs(tmp, configs)
    # five flag combinations (the seed lists each one's layer and size variants together)
    picked = [configs[i] for i in (0, 6, 9, 15, 18)]
    losses = [1.9, 1.6, 2.3, 1.7, 3.1]
    for config, loss in zip(picked, losses):
        write_result(tmp / "results_01_all", config, loss)
    write_result(tmp / "results_01_all", configs[1], 0.0, finished=False)  # a claim, never finished

    first = cli("import", str(grid_file), "rnn_configs.json", "results_01_all")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "432 jobs (432 created, 0 already there); 5 imported as done, 0 skipped" in first.stdout
    assert "1 result file(s) hold only the seed's claim" in first.stdout
    again = cli("import", str(grid_file), "rnn_configs.json", "results_01_all")
    assert "432 jobs (0 created, 432 already there); 0 imported as done, 0 skipped" in again.stdout, again.stdout
    summary = ok(server.api.get("/grids/seed-e2e"))
    assert (summary["counts"]["succeeded"], summary["counts"]["queued"]) == (5, 427)
    assert summary["best"]["value"] == 1.6

    found = cli("status", "--seed-config-id", picked[1]["id"])
    assert found.returncode == 0, found.stderr
    assert "seed-e2e" in found.stdout and "succeeded" in found.stdout and "1.6" in found.stdout
    missing = cli("status", "--seed-config-id", "f" * 64)
    assert missing.returncode == 1 and "no job with external id" in missing.stderr
    table = cli("status", "seed-e2e")
    assert "external id" in table.stdout and picked[1]["id"][:12] in table.stdout  # short, as git shows a sha

    refined = cli("refine", "seed-e2e", "--top", "40%", "--set", "state_size=512", "n_layers=3", "steps=50000",
                  "--name", "seed-e2e-big")
    assert refined.returncode == 0, refined.stdout + refined.stderr
    assert "grid seed-e2e-big (refined from seed-e2e: top 2 by min:min_loss): 2 created" in refined.stdout
    view = ok(server.api.get("/grids/seed-e2e-big"))
    assert view["parent"]["name"] == "seed-e2e" and view["total"] == 2
    rows = ok(server.api.get("/grids/seed-e2e-big/results"))["results"]
    best_two = [picked[1], picked[3]]  # losses 1.6 and 1.7
    assert sorted(json.dumps({k: r["config"][k] for k in ("use_input_gate", "use_forget_gate", "use_output_gate",
                                                          "use_state_gate", "use_residual")}, sort_keys=True)
                  for r in rows) == sorted(json.dumps({k: c[k] for k in ("use_input_gate", "use_forget_gate",
                                                       "use_output_gate", "use_state_gate", "use_residual")},
                                                      sort_keys=True) for c in best_two)
    assert all((r["config"]["state_size"], r["config"]["n_layers"], r["config"]["steps"]) == (512, 3, 50000)
               for r in rows)
    assert ok(server.api.get("/grids/seed-e2e"))["children"] == [{"id": view["id"], "name": "seed-e2e-big"}]
    shown = cli("status", "seed-e2e-big")
    assert "refined from" in shown.stdout and "seed-e2e (grid" in shown.stdout, shown.stdout

    typo = cli("refine", "seed-e2e", "--top", "2", "--set", "state_sise=512")
    assert typo.returncode == 1 and "422" in typo.stderr and "config.state_sise" in typo.stderr, typo.stderr
    unknown = cli("refine", "nope", "--set", "state_size=512")
    assert unknown.returncode == 1 and "404" in unknown.stderr and "nope" in unknown.stderr
    ok(server.api.post("/grids", json={**GRID, "name": "empty"}))
    empty = cli("refine", "empty", "--set", "state_size=512")
    assert empty.returncode == 1 and "no finished job" in empty.stderr
    nothing = cli("refine", "seed-e2e")
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr

    write_result(tmp / "other", configs[7], 1.8, **{"batch size": 128})
    mismatch = cli("import", str(grid_file), "rnn_configs.json", "other")
    assert mismatch.returncode == 2 and "'batch size' is 128" in mismatch.stderr and configs[7]["id"] in mismatch.stderr
    fleet.assert_clean()


def test_import_local_writes_the_database_gridfleet_run_uses(db_url, fleet: Fleet):
    tmp = fleet.tmp
    env = fleet.env(DATABASE_URL=db_url)
    grid_file = tmp / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({**GRID, "name": "seed-local"}))
    configs = seed_configs()
    write_configs(tmp, configs)
    write_result(tmp / "results_01_all", configs[0], 1.7)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*gridfleet_cmd(), *args], env=env, cwd=tmp, capture_output=True, text=True,
                              timeout=180)

    args = ("import", "--local", str(grid_file), "rnn_configs.json", "results_01_all")
    first = cli(*args)
    assert "432 jobs (432 created, 0 already there); 1 imported as done" in first.stdout, first.stdout + first.stderr
    assert "0 created, 432 already there); 0 imported as done, 0 skipped" in cli(*args).stdout

    from sqlalchemy import func, select

    from common import schema as t
    from common.db import make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            states = dict(conn.execute(select(t.jobs.c.state, func.count()).group_by(t.jobs.c.state)).all())
            done = conn.execute(select(t.jobs.c.external_id).where(t.jobs.c.state == "succeeded")).one()
    finally:
        engine.dispose()
    assert states == {"queued": 431, "succeeded": 1}
    assert done.external_id == configs[0]["id"]
