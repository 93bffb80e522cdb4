"""matplotlib (Agg) figures of common/plots/data.py's curves and panels; `write_grid_plots` writes seed 001's set.

Each figure function returns the Figure (tests read the plotted lines and points back); `save` writes a PNG
and closes it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common.plots import data

BEST_CURVES = 10  # a legend stays readable up to about this many lines
LEGEND_UP_TO = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must come before pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def loss_figure(curves: list[data.Curve], metric: str, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for curve in curves:
        ax.plot(curve.steps, curve.values, label=curve.label, linewidth=1.0 if len(curves) > LEGEND_UP_TO else 1.4,
                alpha=0.6 if len(curves) > LEGEND_UP_TO else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves and len(curves) <= LEGEND_UP_TO:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def panels_figure(panels: list[data.Panel], metric: str, title: str):
    plt = _pyplot()
    columns = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        ax.scatter(panel.xs, panel.ys, s=12, alpha=0.7)
        if panel.ticks:
            ax.set_xticks(range(len(panel.ticks)), panel.ticks, fontsize=7, rotation=30 if len(panel.ticks) > 3 else 0)
            ax.set_xlim(-0.5, len(panel.ticks) - 0.5)
        ax.set_xlabel(panel.key, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
    if not panels:
        axes.flat[0].set_visible(True)
        axes.flat[0].text(0.5, 0.5, "no succeeded job with this metric", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def grid_figures(rows: list[dict[str, Any]], metrics_of: data.MetricsOf | None, objective: str | None, name: str,
                 below: float | None = None, curve_metric: str = "loss") -> dict[str, Any]:
    """Seed 001's pictures for one grid, file name -> Figure: all runs' curves, the best runs' curves (legend:
    what differs), the objective against each swept key, and (with `below`) the same for the runs under it."""
    direction, metric = data.parse_objective(objective)
    figures = {}
    chosen = data.with_points(rows, metrics_of, curve_metric)
    if chosen:
        every = data.labelled(chosen)
        figures[f"{name}_all.png"] = loss_figure(every, curve_metric, f"{name}: all {len(every)} runs")
        best = data.labelled(chosen[:BEST_CURVES])  # labelled by what differs among these few
        figures[f"{name}_best.png"] = loss_figure(best, curve_metric,
                                                  f"{name}: best {len(best)} by {direction}:{metric}")
    keys = data.differing_keys(r for r in rows if r["state"] == "succeeded")
    figures[f"{name}_hyperparameters.png"] = panels_figure(data.panels(rows, metric, keys), metric,
                                                           f"{name}: {metric} against each swept key")
    if below is not None:
        chosen_panels = data.panels(rows, metric, keys, below=below)
        count = len(chosen_panels[0].ys) if chosen_panels else 0
        figures[f"{name}_{metric}_below_{below:g}.png"] = panels_figure(
            chosen_panels, metric, f"{name}: {count} runs with {metric} below {below:g}")
    return figures


def write_grid_plots(rows: list[dict[str, Any]], metrics_of: data.MetricsOf | None, objective: str | None,
                     out_dir: Path, name: str, below: float | None = None, curve_metric: str = "loss") -> list[Path]:
    """grid_figures, each saved as out_dir/<file name>."""
    figures = grid_figures(rows, metrics_of, objective, name, below, curve_metric)
    return [save(fig, out_dir / file) for file, fig in figures.items()]
