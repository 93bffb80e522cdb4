"""`gridfleet analyze GRID`: seed 004's dynamics analysis of a learning_rules grid (worker/trainers/rnn_dynamics).

    gridfleet analyze seed-004 [--out DIR] [--db URL | --server URL --token T] [--levels -0.19,0,0.19] ...

Reads the grid's succeeded jobs from the local database (what `gridfleet run` made; --db for another) or from
the API (--server), loads each job's trained matrices, and writes PNGs, summary.json and summary.csv into
--out (default: <home>/runs/<grid>/analysis). Prints a model a row: `stable/saddle` fixed points per input
condition. Exit 2 for bad input, 1 when the grid cannot be read or holds nothing to analyse.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.support import fail



def _levels(text: str) -> tuple[float, ...]:
    try:
        levels = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"--levels must be numbers separated by commas, e.g. -0.1857,0,0.1857; got '{text}'")
    if not levels:
        fail("--levels: give at least one signal level")
    return levels


def _rows_from_db(grid: str, url: str) -> tuple[dict, list[dict]]:
    from sqlalchemy.exc import SQLAlchemyError

    from cli.support import db_problem
    from common.db import make_engine
    from scheduler.grids import NotFound
    from scheduler.reports import grid_results, grid_summary

    engine = make_engine(url)
    try:
        return grid_summary(engine, grid), grid_results(engine, grid)
    except NotFound as exc:
        fail(str(exc), 1)
    except SQLAlchemyError as exc:
        fail(f"cannot read the database: {db_problem(exc)}", 1)
    finally:
        engine.dispose()


def _rows_from_api(grid: str, server: str, token: Optional[str]) -> tuple[dict, list[dict]]:
    from urllib.parse import quote

    from cli.support import api_client, api_request

    client, url = api_client(server, token)
    with client:
        summary = api_request(client, url, "GET", f"/grids/{quote(grid, safe='')}").json()
        rows = api_request(client, url, "GET", f"/grids/{quote(grid, safe='')}/results").json()["results"]
    return summary, rows


def analyze(
    grid: str = typer.Argument(..., help="grid name or id (a learning_rules grid)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: <home>/runs/<grid>/analysis)"),
    db: Optional[str] = typer.Option(None, "--db", help="database URL (default: settings.database_url, the one "
                                     "`gridfleet run` uses)"),
    server: Optional[str] = typer.Option(None, help="read the grid from this API instead of a database"),
    token: Optional[str] = typer.Option(None, help="with --server: any API token (default: GRIDFLEET_TOKEN)"),
    levels: str = typer.Option("-0.1857,0,0.1857", help="signal levels of the constant inputs, per context"),
    trials: int = typer.Option(64, min=1, max=100_000, help="shared trials every model runs"),
    trial_length: Optional[int] = typer.Option(None, min=2, max=100_000, help="steps a trial (default: the grid's)"),
    noise: float = typer.Option(0.1, min=0.0, help="input noise std of the shared trials"),
    starts: int = typer.Option(256, min=1, max=100_000, help="initial states of the fixed-point search"),
    iterations: int = typer.Option(600, min=1, max=1_000_000, help="optimiser steps of the search"),
    seed: int = typer.Option(0, help="seed of the shared trials and the starts"),
    threads: int = typer.Option(1, min=1, max=256, help="torch and BLAS threads (small matrices: 1 is fastest, "
                                "10-20x faster than 2 on a busy 2-core machine)"),
) -> None:
    """Fixed points, PCA pictures and model comparisons (CKA, SVCCA, attractor topology) of a learning_rules grid."""
    from rich.console import Console
    from rich.table import Table

    from common.settings import Settings

    settings = Settings()
    options_kwargs = dict(levels=_levels(levels), trials=trials, trial_length=trial_length, noise=noise,
                          starts=starts, iterations=iterations, seed=seed)
    if server and db:
        fail("give --db or --server, not both")
    summary, rows = _rows_from_api(grid, server, token) if server else _rows_from_db(grid, db or settings.database_url)
    import torch

    from worker.trainers.rnn_dynamics import report
    from worker.trainers.rnn_dynamics.models import NoModels, load_models

    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency; numpy's BLAS oversubscribes too

    threadpool_limits(threads)

    try:
        options = report.Options(**options_kwargs)
    except ValueError as exc:
        fail(str(exc))
    try:
        models, problems = load_models(summary["trainer"], rows, settings.home / "checkpoints",
                                       settings.store_options())
    except NoModels as exc:
        fail(f"grid {summary['name']}: {exc}", 1)
    console = Console(width=max(120, Console().width))
    for problem in problems:
        console.print(f"[yellow]skipped {problem}[/]")
    target = out or settings.home / "runs" / summary["name"] / "analysis"
    console.print(f"grid {summary['name']}: analysing {len(models)} model(s) "
                  f"({summary['counts']['succeeded']} succeeded of {summary['total']} jobs)")
    try:
        result = report.analyze(models, options, target)
    except ValueError as exc:
        fail(f"grid {summary['name']}: {exc}", 1)
    columns, table_rows = report.table(result)
    table = Table(title=f"fixed points per condition (stable/saddle), {summary['name']}")
    for column in columns:
        table.add_column(column, justify="right")
    for row in table_rows:
        table.add_row(*row)
    console.print(table)
    for name, grouping in result["grouping_by_rule"].items():
        silhouette = "-" if grouping["silhouette"] is None else f"{grouping['silhouette']:.2f}"
        nearest = "-" if grouping["nearest_same"] is None else f"{grouping['nearest_same']:.2f}"
        console.print(f"{name:>8}: nearest model has the same rule {nearest}, silhouette by rule {silhouette}")
    console.print(f"{target}: {len(result['files'])} files ({', '.join(result['files'][-4:])}, model-<job>.png); "
                  f"{result['seconds']:.1f} s")
