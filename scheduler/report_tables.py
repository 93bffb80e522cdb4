"""Compact rich tables of grids and their results, for `gridfleet status` and `gridfleet run`: state, the
swept keys and the metrics, not whole configs or loss curves (`--json` has everything)."""
from __future__ import annotations

import json
from typing import Any, Iterable

from common.plots import data

OTHER_METRICS = 3  # result columns besides the objective; `--json` has them all
KEY_COLUMNS = 5  # more swept keys than this share one column of k=v pairs (seed 001 sweeps nine)
TABLE_WIDTH = 120  # columns the tables are printed in at least: at 80 (a pipe, CI) the swept keys vanish
SHORT_ID = 12  # an external id (seed 001's sha256) as a table shows it; --json has it whole


# ---- tables --------------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else data.text(value)


def best_text(best: dict | None) -> str:
    return f"{best['metric']}={fmt(best['value'])} (job {best['job_id']})" if best else "-"


def swept_keys(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The grid's axes (as its spec names them), else the config keys that differ between its jobs (an
    imported grid lists its configs instead of axes)."""
    spec = summary.get("spec") or {}
    keys = [*(spec.get("axes") or {}), *(k for group in spec.get("zip") or [] for k in group),
            *((spec.get("search") or {}).get("space") or {})]
    if len({r["seed"] for r in rows}) > 1:
        keys.append("seed")
    return keys or data.differing_keys(rows)


def metric_columns(rows: list[dict[str, Any]], objective: str | None, skip: Iterable[str] = ()) -> list[str]:
    """The objective's metric first, then the first few other numbers the results hold (no lists, no times, no
    echo of a config key in `skip`, such as a trainer's `steps`)."""
    _, first = data.parse_objective(objective)
    names = [first]
    skip = set(skip)
    for row in rows:
        echoed = skip | {k.rsplit(".", 1)[-1] for k in data.flat(row["config"])}  # batch_size, steps: the config's
        for key, value in (row.get("result") or {}).items():
            if key in names or key in echoed or key.endswith("time") or data.metric_value({key: value}, key) is None:
                continue
            if len(names) > OTHER_METRICS:
                return names
            names.append(key)
    return names


def state_text(row: dict[str, Any]) -> str:
    """The job's state; a pruned job shows the step (and ASHA rung) it was stopped at."""
    pruned = row.get("pruned")
    if row["state"] != "pruned" or not pruned:
        return row["state"]
    rung = f" rung {pruned['rung']}" if pruned.get("rung") is not None else ""
    return f"pruned@{pruned['step']}{rung}"


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "seed":
        return str(row["seed"])
    flat = data.flat(row["config"])
    while key not in flat and "." in key:  # an axis into a list ("block_types.1") shows the whole list
        key = key.rsplit(".", 1)[0]
    return fmt(flat.get(key))


def _header(key: str, keys: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in keys) == 1 else key


def search_text(search: dict[str, Any] | None) -> str:
    """A grid's search in a line: sampler, trials done of n_trials, in flight, best value and its params."""
    if not search:
        return "-"
    text = (f"{search['sampler']}: {search['done']}/{search['n_trials']} trials done, {search['in_flight']} in flight"
            f" ({search['direction']} {search['metric']}{', finished' if search['state'] == 'done' else ''})")
    best = search.get("best")
    if best:
        params = " ".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in best["params"].items())
        text += f"; best {fmt(best['value'])} (trial {best['trial']}, job {best['job_id']}: {params})"
    return text


def _total(g: dict[str, Any]) -> str:
    search = g.get("search")  # a search grid: jobs so far of the trials it will run
    return f"{g['total']}/{search['n_trials']}" if search else str(g["total"])


def grids_table(grids: list[dict[str, Any]]):
    from rich.table import Table

    from scheduler.policy import JOB_STATES

    table = Table(title="grids")
    for column in ("name", "trainer", "state", *JOB_STATES, "total", "progress", "best"):
        table.add_column(column, justify="right" if column in (*JOB_STATES, "total", "progress") else "left")
    for g in grids:
        table.add_row(g["name"], g["trainer"], g["state"], *(str(g["counts"][s]) for s in JOB_STATES),
                      _total(g), f"{100 * g['progress']:.1f}%", best_text(g["best"]))
    return table


def summary_table(summary: dict[str, Any]):
    from rich.table import Table

    from scheduler.policy import JOB_STATES

    head = Table(title=f"grid {summary['name']}", show_header=False)
    head.add_column("field")
    head.add_column("value")
    head.add_row("trainer", summary["trainer"])
    head.add_row("state", summary["state"])
    head.add_row("objective", summary["objective"] or "-")
    head.add_row("jobs", f"{summary['total']} total: " + ", ".join(f"{summary['counts'][s]} {s}" for s in JOB_STATES))
    head.add_row("progress", f"{100 * summary['progress']:.1f}%")
    head.add_row("best", best_text(summary["best"]))
    if summary.get("search"):
        head.add_row("search", search_text(summary["search"]))
    if summary.get("parent"):
        head.add_row("refined from", f"{summary['parent']['name']} (grid {summary['parent']['id']})")
    if summary.get("children"):
        head.add_row("refined into", ", ".join(c["name"] for c in summary["children"]))
    return head


def results_table(summary: dict[str, Any], rows: list[dict[str, Any]], top: int | None):
    """job, state, external id (when any), the swept keys, the metrics: one short line per job."""
    from rich.table import Table

    shown = rows[:top] if top else rows
    keys = swept_keys(summary, rows)
    metrics = metric_columns(shown, summary["objective"], skip=[_header(k, keys) for k in keys])
    one_column = len(keys) > KEY_COLUMNS
    metrics = metrics[:2] if one_column else metrics  # the k=v column needs the width
    with_ids = any(r.get("external_id") for r in shown)  # e.g. seed 001's config id
    what = f"top {len(shown)} of {len(rows)}" if top and len(rows) > top else f"all {len(rows)}"
    table = Table(title=f"{what} jobs" + (f" by {summary['objective']}" if summary["objective"] else ""))
    for column in ("job", "state", *(["external id"] if with_ids else [])):
        table.add_column(column, no_wrap=True)
    for key in ["swept keys"] if one_column else keys:
        table.add_column("swept keys (flags: those on)" if one_column else _header(key, keys),
                         justify="left" if one_column else "right")
    for metric in metrics:
        table.add_column(metric, justify="right", no_wrap=True, style="bold" if metric == metrics[0] else None)
    for row in shown:
        values = [_cell(row, k) for k in keys]
        if one_column:  # flags by name when on, left out when off (seed 001's seven gates fit on a line or two)
            values = [" ".join(sorted((f"{_header(k, keys)}={v}" for k, v in zip(keys, values)
                                       if v not in ("true", "false")), key=len)
                               + [_header(k, keys) for k, v in zip(keys, values) if v == "true"])]
        table.add_row(str(row["job_id"]), state_text(row),
                      *([(row.get("external_id") or "-")[:SHORT_ID]] if with_ids else []), *values,
                      *(fmt(data.metric_value(row["result"], m)) for m in metrics))
    return table


def jobs_table(external_id: str, jobs: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title=f"jobs with external id {external_id}")
    for column in ("job", "grid", "state", "seed", "config", "result"):
        table.add_column(column)
    for job in jobs:
        result = {k: v for k, v in (job["result"] or {}).items() if not isinstance(v, (list, dict))}
        table.add_row(str(job["job_id"]), job["grid"], state_text(job), str(job["seed"]),
                      json.dumps(job["config"], sort_keys=True), json.dumps(result, sort_keys=True) if result else "-")
    return table
