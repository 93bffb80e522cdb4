"""`gridfleet status` and `gridfleet plots` on the database a real `gridfleet run` wrote: no server, no token."""
from __future__ import annotations

import json
import subprocess

from tests.e2e.processes import Fleet, gridfleet_cmd

GRID = """
name: seen
trainer: sleep
objective: min:loss
config:
  seconds: 0.05
axes:
  steps: [2, 4, 5]
"""


def test_status_and_plots_read_the_embedded_run(fleet: Fleet, tmp_path):
    from common.db import make_engine
    from common.plots import png
    from scheduler.reports import grid_results, job_metrics

    home = tmp_path / "home"
    (tmp_path / "grid.yaml").write_text(GRID)
    env = fleet.env(GRIDFLEET_HOME=str(home), COLUMNS="160")  # no server url, no token

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*gridfleet_cmd(), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=240)

    missing = cli("status")
    assert missing.returncode == 1 and "no local database" in missing.stderr, missing.stderr
    run = cli("run", "grid.yaml", "--workers", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "grid 0.0%" not in run.stdout  # the live display's first frame names the grid and its counts

    grids = cli("status")
    assert grids.returncode == 0, grids.stderr
    assert "seen" in grids.stdout and "100.0%" in grids.stdout
    table = cli("status", "seen")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert any("steps" in line and "loss" in line for line in lines), table.stdout  # the swept key, the metric
    best = next(line for line in lines if " 0.2 " in f" {line} ")  # steps=5: loss 1/5, first
    assert "succeeded" in best and " 5 " in best, table.stdout
    assert "seconds" not in table.stdout and "{" not in table.stdout  # not the whole config or result JSON
    everything = json.loads(cli("status", "seen", "--json").stdout)
    assert [r["config"]["steps"] for r in everything["results"]] == [5, 4, 2]
    assert everything["grid"]["best"]["value"] == 0.2
    assert cli("status", "nope").returncode == 1

    out = tmp_path / "plots"
    plots = cli("plots", "seen", "--out", str(out), "--below", "0.3")
    assert plots.returncode == 0, plots.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["seen_all.png", "seen_best.png", "seen_hyperparameters.png", "seen_loss_below_0.3.png"]
    for name in written:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000
    assert (home / "runs" / "seen" / "loss_curves.png").stat().st_size > 5000

    # the figures `plots` drew hold the run's numbers (the same functions, on the same database)
    engine = make_engine(f"sqlite:///{home / 'gridfleet.db'}")
    try:
        rows = grid_results(engine, "seen")
        figures = png.grid_figures(rows, lambda job_id: job_metrics(engine, job_id), "min:loss", "seen", below=0.3)
        expected = [[m["loss"] for m in job_metrics(engine, r["job_id"])] for r in rows]
    finally:
        engine.dispose()
    best_axes = figures["seen_best.png"].axes[0]
    assert [list(line.get_ydata()) for line in best_axes.get_lines()] == expected
    assert [t.get_text() for t in best_axes.get_legend().get_texts()] == ["steps=5", "steps=4", "steps=2"]
    (panel,) = [ax for ax in figures["seen_hyperparameters.png"].axes if ax.get_visible()]
    assert panel.get_xlabel() == "steps"
    assert panel.collections[0].get_offsets().tolist() == [[5.0, 0.2], [4.0, 0.25], [2.0, 0.5]]
    (low,) = [ax for ax in figures["seen_loss_below_0.3.png"].axes if ax.get_visible()]
    assert low.collections[0].get_offsets().tolist() == [[5.0, 0.2], [4.0, 0.25]]
    fleet.assert_clean()
