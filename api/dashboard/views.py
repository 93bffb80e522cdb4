"""What the dashboard's pages read that the plain JSON API does not give in one call: the grids with the
workers on each, one grid's results reduced to its swept keys and numeric metrics (with labels naming what
differs and a hyper-parameter importance ranking), and the metric curves of a few selected jobs.

Everything here only reads (scheduler/reports.py underneath); the JavaScript pages draw it.
"""
from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Engine, select

from common import schema as t
from common.db import read_tx
from scheduler import reports

IMPORTANCE_METHOD = ("eta squared: the variance of the per-value mean objective over the variance of the "
                     "objective (finished jobs only; 1 = the key alone explains the spread)")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _workers_by_grid(engine: Engine) -> dict[int, list[dict[str, str]]]:
    with read_tx(engine) as conn:
        rows = conn.execute(
            select(t.jobs.c.grid_id, t.workers.c.id, t.workers.c.name).distinct()
            .select_from(t.running)  # the running jobs (a trigger keeps the table), not every job
            .join(t.jobs, t.jobs.c.id == t.running.c.job_id)
            .join(t.workers, t.workers.c.id == t.running.c.worker_id)
            .where(t.jobs.c.state == "running").order_by(t.workers.c.name)
        ).all()
    out: dict[int, list[dict[str, str]]] = {}
    for grid_id, worker_id, name in rows:
        out.setdefault(grid_id, []).append({"id": worker_id, "name": name})
    return out


def grids_overview(engine: Engine) -> list[dict[str, Any]]:
    """Every grid's summary (no spec) with the workers running its jobs now."""
    workers = _workers_by_grid(engine)
    rows = reports.list_grids(engine)
    for row in rows:
        row.pop("spec", None)
        row["workers"] = workers.get(row["id"], [])
    return rows


def swept_keys(configs: list[dict[str, Any]]) -> list[str]:
    """The flattened config keys whose values are not the same in every job, in first-seen order."""
    keys: list[str] = []
    for config in configs:
        keys.extend(k for k in config if k not in keys)
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def label(config: dict[str, Any], keys: list[str]) -> str:
    """`state_size=64, use_forget_gate=false`: a job named by the keys that differ."""
    def show(value: Any) -> str:
        return "true" if value is True else "false" if value is False else str(value)

    return ", ".join(f"{k}={show(config.get(k))}" for k in keys)


def importance(rows: list[dict[str, Any]], keys: list[str], metric: str) -> list[dict[str, Any]]:
    """Each swept key's share of the objective's variance explained by its values (eta squared), best
    first; None when fewer than two finished jobs have the objective or it does not vary."""
    scored = [(r["config"], v) for r in rows if (v := _number((r["result"] or {}).get(metric))) is not None]
    values = [v for _, v in scored]
    if len(values) < 2:
        return [{"key": k, "score": None} for k in keys]
    mean = sum(values) / len(values)
    total = sum((v - mean) ** 2 for v in values)
    ranking = []
    for key in keys:
        groups: dict[str, list[float]] = {}
        for config, value in scored:
            groups.setdefault(repr(config.get(key)), []).append(value)
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
        ranking.append({"key": key, "score": between / total if total > 0 else None})
    ranking.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
    return ranking


def grid_view(engine: Engine, grid: str | int) -> dict[str, Any]:
    """One grid for its page: the summary, the swept keys, one row per job (swept config values, numeric
    final metrics, the newest reported metrics while it runs, a label), the metric names and the ranking."""
    summary = reports.grid_summary(engine, grid)
    spec = summary.pop("spec", None) or {}
    results = reports.grid_results(engine, summary["id"])
    configs = [reports.flatten("", r["config"], {}) for r in results]
    keys = swept_keys(configs)
    seeds_vary = len({r["seed"] for r in results}) > 1
    # Pruned jobs have no result: their last reported values are what they reached.
    latest = reports.latest_metrics(engine, [r["job_id"] for r in results if r["state"] in ("running", "pruned")])
    rows, metrics = [], []
    for result, config in zip(results, configs):
        final = {k: v for k, v in (result["result"] or {}).items() if _number(v) is not None}
        newest = {k: v for k, v in latest.get(result["job_id"], {}).items() if _number(v) is not None}
        metrics.extend(k for k in [*final, *newest] if k not in metrics)
        shown = {k: config.get(k) for k in keys}
        name = label(shown, keys)
        if seeds_vary:
            name = f"{name}, seed={result['seed']}" if name else f"seed={result['seed']}"
        rows.append({"job_id": result["job_id"], "state": result["state"], "seed": result["seed"],
                     "step": result["step"], "attempts": result["attempts"], "config": shown,
                     "result": final, "latest": newest, "label": name, "pruned": result.get("pruned")})
    objective = summary["objective"]
    metric = objective.split(":", 1)[1] if objective else (metrics[0] if metrics else None)
    return {
        "grid": summary, "base_config": spec.get("config", {}), "swept": keys, "metrics": metrics,
        "objective_metric": metric, "direction": objective.split(":", 1)[0] if objective else "min",
        "rows": rows,
        "importance": importance(rows, keys, metric) if metric else [],
        "importance_method": IMPORTANCE_METHOD,
    }


def curves(engine: Engine, job_ids: list[int], metric: str) -> dict[str, Any]:
    """`metric` against step for each job (every attempt's points, in step order)."""
    out = []
    for job_id in job_ids:
        points = [(m["step"], v) for m in reports.job_metrics(engine, job_id)
                  if (v := _number(m.get(metric))) is not None]
        out.append({"job_id": job_id, "steps": [s for s, _ in points], "values": [v for _, v in points]})
    return {"metric": metric, "curves": out}
