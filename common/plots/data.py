"""Plot data from result rows: labels by what differs, loss curves, objective-against-key panels.

A row is one job as `scheduler.reports.grid_results` gives it: job_id, state, seed, config, result; rows
come best first. Nested config sections are named by dotted keys ("training.lr"), as grid axes name them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

MetricsOf = Callable[[int], list[dict[str, Any]]]  # job id -> its metric rows ({"step": .., "loss": ..})


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys; lists stay whole (one value)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def text(value: Any) -> str:
    """A config value as a person writes it in a grid file: false, 0.001, [1, 2], adam."""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)


def differing_keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The config keys whose values are not all the same across `rows`, sorted; "seed" last when seeds differ."""
    rows = list(rows)
    flats = [flat(r["config"]) for r in rows]
    keys = sorted({k for f in flats for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
    if len({r.get("seed") for r in rows}) > 1:
        varying.append("seed")
    return varying


def label(row: dict[str, Any], keys: list[str]) -> str:
    """`state_size=64, use_forget_gate=false`: the row's values of `keys` (a lone config: its job id)."""
    values = flat(row["config"])
    parts = [f"{k}={text(row.get('seed') if k == 'seed' else values.get(k))}" for k in keys]
    return ", ".join(parts) if parts else f"job {row['job_id']}"


def metric_value(result: Any, metric: str) -> float | None:
    value = result.get(metric) if isinstance(result, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def parse_objective(objective: str | None, default: str = "min:loss") -> tuple[str, str]:
    """"min:loss" -> ("min", "loss")."""
    direction, _, metric = (objective or default).partition(":")
    return direction, metric


@dataclass
class Curve:
    job_id: int
    label: str
    steps: list[float]
    values: list[float]


def curve_points(row: dict[str, Any], metrics_of: MetricsOf | None, metric: str) -> list[tuple[float, float]]:
    """The job's `metric` against step from its stored metrics, else from its result's `loss_curve` (imported
    seed 001 results have only that: [[step, loss], ...] or a plain list)."""
    points = []
    if metrics_of is not None:
        points = [(float(m["step"]), float(v)) for m in metrics_of(row["job_id"])
                  if (v := metric_value(m, metric)) is not None]
    if not points and metric == "loss":
        stored = (row.get("result") or {}).get("loss_curve")
        if isinstance(stored, list):
            for i, item in enumerate(stored):
                step, value = (item[0], item[1]) if isinstance(item, (list, tuple)) and len(item) == 2 else (i, item)
                if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
                    points.append((float(step), float(value)))
    return points


def with_points(rows: list[dict[str, Any]], metrics_of: MetricsOf | None, metric: str = "loss",
                limit: int | None = None) -> list[tuple[dict[str, Any], list[tuple[float, float]]]]:
    """(row, points) of the succeeded rows that have a curve, in the rows' order (best first), at most `limit`."""
    chosen = []
    for row in rows:
        if limit is not None and len(chosen) >= limit:
            break
        if row["state"] != "succeeded":
            continue
        points = curve_points(row, metrics_of, metric)
        if len(points) > 1:
            chosen.append((row, points))
    return chosen


def labelled(chosen: list[tuple[dict[str, Any], list[tuple[float, float]]]]) -> list[Curve]:
    """Curves labelled by what differs between the configs shown together."""
    keys = differing_keys(row for row, _ in chosen)
    return [Curve(row["job_id"], label(row, keys), [s for s, _ in points], [v for _, v in points])
            for row, points in chosen]


def curves(rows: list[dict[str, Any]], metrics_of: MetricsOf | None, metric: str = "loss",
           limit: int | None = None) -> list[Curve]:
    return labelled(with_points(rows, metrics_of, metric, limit))


@dataclass
class Panel:
    """The objective against one swept key: numeric x, or categories placed at 0..n-1 with `ticks`."""

    key: str
    xs: list[float]
    ys: list[float]
    job_ids: list[int]
    ticks: list[str] = field(default_factory=list)  # empty when x is numeric


def panels(rows: list[dict[str, Any]], metric: str, keys: list[str] | None = None,
           below: float | None = None) -> list[Panel]:
    """One panel per key (default: the keys that differ) over the succeeded rows with a finite `metric`,
    only those with metric < `below` when given (seed 001's "loss below 1.9")."""
    scored = [(r, v) for r in rows
              if r["state"] == "succeeded" and (v := metric_value(r["result"], metric)) is not None]
    if below is not None:
        scored = [(r, v) for r, v in scored if v < below]
    keys = differing_keys(r for r, _ in scored) if keys is None else keys
    out = []
    for key in keys:
        values = [r.get("seed") if key == "seed" else flat(r["config"]).get(key) for r, _ in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs, ticks = [float(v) for v in values], []
        else:
            ticks = sorted({text(v) for v in values})
            xs = [float(ticks.index(text(v))) for v in values]
        out.append(Panel(key, xs, [v for _, v in scored], [r["job_id"] for r, _ in scored], ticks))
    return out
