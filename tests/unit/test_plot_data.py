"""common/plots: labels by what differs, curves, panels, and the figures drawn from them."""
from __future__ import annotations

from common.plots import data, png


def row(job_id, config, loss, seed=0, state="succeeded", curve=None):
    result = {"min_loss": loss, **({"loss_curve": curve} if curve is not None else {})}
    return {"job_id": job_id, "state": state, "seed": seed, "config": config, "result": result}


ROWS = [
    row(8, {"state_size": 64, "use_forget_gate": False, "lr": 0.001, "model": {"n_layers": 2}}, 1.6),
    row(5, {"state_size": 256, "use_forget_gate": False, "lr": 0.001, "model": {"n_layers": 2}}, 1.8),
    row(3, {"state_size": 64, "use_forget_gate": True, "lr": 0.001, "model": {"n_layers": 3}}, 2.4),
    row(9, {"state_size": 64, "use_forget_gate": True, "lr": 0.001, "model": {"n_layers": 3}}, None, state="failed"),
]
METRICS = {8: [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "raw": 1.0}],
           5: [{"step": 1, "loss": 3.1}, {"step": 2, "loss": 2.5}], 3: []}


def test_labels_name_only_what_differs_as_a_grid_file_writes_it():
    keys = data.differing_keys(ROWS[:3])
    assert keys == ["model.n_layers", "state_size", "use_forget_gate"]  # lr is the same everywhere
    assert data.label(ROWS[0], keys) == "model.n_layers=2, state_size=64, use_forget_gate=false"
    assert data.label(ROWS[0], data.differing_keys(ROWS[:2])) == "state_size=64"
    seeds = [row(1, {"a": 1}, 1.0, seed=1), row(2, {"a": 1}, 1.0, seed=2)]
    assert [data.label(r, data.differing_keys(seeds)) for r in seeds] == ["seed=1", "seed=2"]
    assert data.label(ROWS[0], []) == "job 8"


def test_curves_come_from_metrics_else_from_the_results_loss_curve():
    rows = [*ROWS[:2], {**ROWS[2], "result": {**ROWS[2]["result"], "loss_curve": [[50, 2.9], [100, 2.4]]}}]
    curves = data.curves(rows, METRICS.__getitem__)
    assert [(c.job_id, c.steps, c.values) for c in curves] == [
        (8, [1.0, 2.0], [3.0, 2.0]), (5, [1.0, 2.0], [3.1, 2.5]), (3, [50.0, 100.0], [2.9, 2.4])]
    assert curves[1].label == "model.n_layers=2, state_size=256, use_forget_gate=false"
    assert [c.job_id for c in data.curves(rows, METRICS.__getitem__, limit=2)] == [8, 5]
    assert data.curves(rows, METRICS.__getitem__, limit=2)[0].label == "state_size=64"  # differs among those two


def test_panels_put_each_key_against_the_objective_and_filter_below():
    panels = {p.key: p for p in data.panels(ROWS, "min_loss")}
    assert set(panels) == {"model.n_layers", "state_size", "use_forget_gate"}  # the failed job is left out
    assert panels["state_size"].xs == [64.0, 256.0, 64.0] and panels["state_size"].ys == [1.6, 1.8, 2.4]
    assert panels["use_forget_gate"].ticks == ["false", "true"] and panels["use_forget_gate"].xs == [0.0, 0.0, 1.0]
    low = data.panels(ROWS, "min_loss", keys=["state_size"], below=2.0)
    assert low[0].ys == [1.6, 1.8] and low[0].job_ids == [8, 5]


def test_figures_hold_the_plotted_values_and_legends():
    figures = png.grid_figures(ROWS, METRICS.__getitem__, "min:min_loss", "g", below=2.0)
    assert set(figures) == {"g_all.png", "g_best.png", "g_hyperparameters.png", "g_min_loss_below_2.png"}
    best = figures["g_best.png"].axes[0]
    assert [list(line.get_ydata()) for line in best.get_lines()] == [[3.0, 2.0], [3.1, 2.5]]
    assert [t.get_text() for t in best.get_legend().get_texts()] == ["state_size=64", "state_size=256"]
    scatter = {ax.get_xlabel(): ax.collections[0].get_offsets().tolist() for ax in figures["g_hyperparameters.png"].axes
               if ax.get_visible()}
    assert scatter["state_size"] == [[64.0, 1.6], [256.0, 1.8], [64.0, 2.4]]
    below = {ax.get_xlabel(): ax.collections[0].get_offsets().tolist()
             for ax in figures["g_min_loss_below_2.png"].axes if ax.get_visible()}
    assert below["use_forget_gate"] == [[0.0, 1.6], [0.0, 1.8]]
