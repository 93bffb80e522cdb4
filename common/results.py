"""Result exports: CSV of a grid's results and a PNG of the best jobs' loss curves (common/plots)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from common.plots import data

CURVES_IN_PLOT = 10


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_loss_curves(metrics_of: data.MetricsOf, rows: list[dict[str, Any]], path: Path, objective: str | None,
                     metric: str = "loss") -> Path | None:
    """Loss against step for the best jobs (rows come sorted best first), each line labelled by what differs
    between their configs. None when there is nothing to plot."""
    from common.plots import png

    curves = data.curves(rows, metrics_of, metric, limit=CURVES_IN_PLOT)
    if not curves:
        return None
    title = f"{metric} curves, best {len(curves)}" + (f" by {objective}" if objective else "")
    return png.save(png.loss_figure(curves, metric, title), path)
