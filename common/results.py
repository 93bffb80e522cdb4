"""Result exports: CSV of a grid's results and a PNG of loss curves."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

CURVES_IN_PLOT = 10


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_loss_curves(engine, rows: list[dict[str, Any]], path: Path, objective: str | None,
                     metric: str = "loss") -> Path | None:
    """Loss against step for the best jobs (rows come sorted best first). None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scheduler.reports import job_metrics

    curves = []
    for row in rows:
        if row["state"] != "succeeded":
            continue
        points = [(m["step"], m[metric]) for m in job_metrics(engine, row["job_id"]) if isinstance(m.get(metric), (int, float))]
        if len(points) > 1:
            curves.append((row, points))
        if len(curves) >= CURVES_IN_PLOT:
            break
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for row, points in curves:
        steps, values = zip(*points)
        ax.plot(steps, values, label=f"job {row['job_id']}", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} curves, best {len(curves)}" + (f" by {objective}" if objective else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
