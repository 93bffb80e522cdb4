"""Embedded mode: `gridfleet run GRID.yaml --workers N` on one machine, SQLite under ./.gridfleet/.

Submits the grid (only configs not stored yet), requeues jobs a previous run left running, starts N local
agents that use the queue directly, shows live progress, and at the end writes a results table, a CSV
and a PNG of the loss curves. Ctrl-C preempts: running jobs checkpoint, and the same command continues.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.checkpoints import StoreOptions
from common.db import make_engine, migrate
from common.plots import data
from common.settings import Settings
from scheduler.grids import submit_grid
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.search import Searches
from scheduler.reports import (grid_results, grid_summary, job_metrics, latest_metric_rows, results_table,
                               running_jobs)
from scheduler.spec import GridSpec
from worker import logs
from worker.agent import Agent, AgentOptions
from worker.client import DirectClient
from common.results import plot_loss_curves, write_csv

REFRESH_SECONDS = 1.0  # the live display's redraw
POLL_SECONDS = 0.1  # how soon the end of the grid is seen: one count query, not a redraw
_run_lock = None  # this run's lock file; a forked agent closes its copy (the lock stays the command's)


@dataclass
class RunOutcome:
    finished: bool
    summary: dict[str, Any]
    out_dir: Path


def _worker_main(url: str, settings_dump: dict, stores: StoreOptions, grid_id: int, trainer: str, index: int,
                 log_path: str) -> None:
    """One local agent process. Logs to a file so the live display stays readable."""
    if _run_lock is not None:  # forked: only the command holds the run lock, as with a spawned agent
        _run_lock.close()
    logs.configure(filename=log_path, format="%(asctime)s %(message)s")
    settings = Settings(**settings_dump)
    from worker.trainers import external_id, fuse_key

    engine = make_engine(url)
    queue = Queue(engine, RetryPolicy.from_settings(settings))
    searches = Searches(engine, external_id=external_id, fuse_key=fuse_key)  # a finished trial asks the next
    # The grid's one trainer: its warm process imports that, not every trainer this install knows.
    options = AgentOptions(name=f"local-{index}", home=settings.home, grace_seconds=30.0, trainers=[trainer],
                           stores=stores, warm_starts=settings.warm_starts, max_gang=settings.gang_size)
    agent = Agent(DirectClient(queue, settings.heartbeat_seconds, settings.max_gang_jobs, searches=searches), options)
    agent.claim_filters = {"grid_id": grid_id}
    agent.run()


def run_grid(spec: GridSpec, workers: int, settings: Settings, console: Console) -> RunOutcome:
    from worker.trainers import external_id, fuse_key, validate_config

    settings.home.mkdir(parents=True, exist_ok=True)
    _single_run_lock(settings.home)  # held in _run_lock until the process exits
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    policy = RetryPolicy.from_settings(settings)
    queue = Queue(engine, policy)
    submitted = submit_grid(engine, spec, validate_config, external_id=external_id, fuse_key=fuse_key)
    if spec.search is not None:
        console.print(f"grid [bold]{spec.name}[/]: a {spec.search.sampler} search of {submitted.total} trials")
    else:
        console.print(f"grid [bold]{spec.name}[/]: {submitted.created} new configs, "
                      f"{submitted.existing} already stored ({submitted.total} in all)")
    # Whatever a previous run left 'running' died with it (we hold the run lock): requeue it now.
    requeued = queue.expire_leases_of_dead_workers(silent_for=0.0)
    if requeued:
        console.print(f"requeued {requeued} job(s) left running by an earlier run (resuming from checkpoints)")
    searches = Searches(engine, external_id=external_id, fuse_key=fuse_key) if spec.search is not None else None
    if searches is not None:  # the first trials (or, after an interrupted run, what it left untold)
        searches.clear_lease(submitted.grid_id)  # an earlier run killed mid-advance held it; we hold the run lock
        searches.advance(submitted.grid_id)
    out_dir = settings.home / "runs" / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)

    # Forked, not spawned: an agent starts with this process's imports (about 0.7 s of them each, more on a
    # busy machine). No connection may cross the fork (SQLite's rule): the engine lets go of its pool first.
    engine.dispose()
    if searches is not None:
        searches.close()  # Optuna's own pool too (the watcher's next advance opens it again)
    mp = multiprocessing.get_context("fork")
    # Secrets are masked in a JSON dump; the Hub tokens travel (pickled, never printed) in StoreOptions.
    dump = settings.model_dump(mode="json", exclude={"admin_token", "token", "hf_token", "hf_read_token",
                                                     "hf_write_token"})
    procs = [
        mp.Process(target=_worker_main, args=(settings.database_url, dump, settings.store_options(),
                                              submitted.grid_id, spec.trainer, i,
                                              str(out_dir / f"worker-{i}.log")))
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    finished = False
    try:
        finished = _watch(engine, submitted.grid_id, procs, console, _spec_keys(spec), searches)
        if not console.is_terminal:  # rich ends a live display's last frame with a newline only on a terminal
            console.line()
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: running jobs are checkpointing and will be released "
                      "(Ctrl-C again to kill)[/]")
    finally:
        # Every job ended: the idle agents stop while the results are written. Otherwise wait for their jobs'
        # checkpoints and releases first, so the results show them.
        _signal_workers(procs)
        if not finished:
            _join_workers(procs, console)
    summary = grid_summary(engine, submitted.grid_id)
    rows = grid_results(engine, submitted.grid_id)
    _print_results(console, summary, rows)
    columns, flat = results_table(rows)
    write_csv(out_dir / "results.csv", columns, flat)
    png = plot_loss_curves(lambda job_id: job_metrics(engine, job_id), rows, out_dir / "loss_curves.png",
                           objective=summary["objective"])
    console.print(f"results: {out_dir / 'results.csv'}" + (f", loss curves: {png}" if png else ""))
    _join_workers(procs, console)  # at once unless every job ended
    if not finished:
        console.print("[yellow]not finished: run the same command again to continue where it stopped[/]")
    engine.dispose()
    return RunOutcome(finished=finished, summary=summary, out_dir=out_dir)


def _counts(summary: dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in summary["counts"].items() if v)


def _progress_bar(console: Console, summary: dict[str, Any]):
    """The grid's bar, made from its first summary: the first frame already names the grid and its counts."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                   TextColumn("{task.fields[counts]}"), TimeElapsedColumn(), console=console)
    task = bar.add_task(summary["name"], total=1.0, completed=summary["progress"], counts=_counts(summary))
    return bar, task


def _watch(engine, grid_id: int, procs, console: Console, keys: list[str] | None, searches=None) -> bool:
    """Live display until every job of the grid has ended (and its search, if any, is done). True when
    finished. The workers' finishes ask a search's next trials; each refresh here looks too."""
    summary = grid_summary(engine, grid_id)
    bar, task = _progress_bar(console, summary)
    with Live(_frame(bar, engine, grid_id, keys), console=console, refresh_per_second=4, transient=False) as live:
        redraw = 0.0
        while True:
            counts = summary["counts"]
            search_done = summary["search"] is None or summary["search"]["state"] == "done"
            ended = counts["queued"] == 0 and counts["running"] == 0 and search_done
            if ended or time.monotonic() >= redraw:
                bar.update(task, completed=summary["progress"], counts=_counts(summary))
                live.update(_frame(bar, engine, grid_id, keys))
                redraw = time.monotonic() + REFRESH_SECONDS
                if searches is not None and not ended:  # once a refresh, as before: the finishes ask too
                    searches.advance(grid_id)
            if ended:
                return True
            if not any(p.is_alive() for p in procs):
                console.print("[red]all workers exited before the grid finished; see worker-*.log[/]")
                return False
            time.sleep(POLL_SECONDS)
            summary = grid_summary(engine, grid_id)


def _frame(bar, engine, grid_id: int, keys: list[str] | None) -> Group:
    running = _running_table(engine, grid_id, keys)
    return Group(bar, running) if running.row_count else Group(bar)  # no empty header once nothing runs


def _running_table(engine, grid_id: int, keys: list[str] | None) -> Table:
    table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    for column in ("job", "attempt", "step", "progress", "loss", "config"):
        table.add_column(column)
    jobs = running_jobs(engine, grid_id)
    latest = latest_metric_rows(engine, [job["id"] for job in jobs])
    for job in jobs:
        step, done, total, loss = _now(job, latest.get(job["id"]))
        table.add_row(
            str(job["id"]), str(job["attempts"]), "" if step is None else str(step),
            f"{100 * done / total:.0f}%" if done is not None and total else "",
            f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
            _short_config(job["config"], keys=keys),
        )
    return table


def _now(job: dict[str, Any], newest: dict[str, Any] | None):
    """(step, done, total, loss) of a running job, all from one moment: the newest report of the current attempt
    (its step, progress and loss come together); before that attempt reports, the checkpoint it resumes from.
    jobs.step alone would not do: a checkpoint pointer recorded late sets it back to an older step."""
    total = job["progress_total"]
    if newest is not None and newest["attempt_id"] == job["attempt_id"]:
        return newest["step"], job["progress_done"], total, newest["values"].get("loss")
    resumed = (job["checkpoint"] or {}).get("step")
    return resumed, resumed if total else None, total, None


def _short_config(config: dict[str, Any], width: int = 70, keys: list[str] | None = None) -> str:
    """`k=v` pairs; only `keys` (what the grid sweeps) when given, so rows differ where the configs do."""
    flat = data.flat(config)  # dotted keys ("training.lr"), as grid axes name them
    if keys is not None:
        keys = [_present(key, flat) for key in keys]
    shown = {k: v for k, v in flat.items() if keys is None or k in keys}
    leaves = [k.rsplit(".", 1)[-1] for k in shown]
    # a section's name is noise in a narrow column when the leaf alone is unambiguous
    labels = [leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(shown, leaves)]
    text = " ".join(f"{label}={v}" for label, v in zip(labels, shown.values()))
    return text if len(text) <= width else text[: width - 1] + "…"


def _present(key: str, flat: dict[str, Any]) -> str:
    """An axis into a list ("block_types.1.0") shows as the list's key: lists are not flattened."""
    while key not in flat and "." in key:
        key = key.rsplit(".", 1)[0]
    return key


def _spec_keys(spec: GridSpec) -> list[str] | None:
    keys = [*spec.axes, *(k for group in spec.zip for k in group), *(spec.search.space if spec.search else ())]
    return keys or None


def _signal_workers(procs) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: the agent preempts its job with a checkpoint


def _join_workers(procs, console: Console) -> None:
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        console.print("[red]killing workers; their jobs resume from the last checkpoint next time[/]")
        for proc in procs:
            proc.kill()
            proc.join()


def _print_results(console: Console, summary: dict[str, Any], rows: list[dict[str, Any]], top: int = 10) -> None:
    from scheduler.report_tables import TABLE_WIDTH, results_table  # the same table as `gridfleet status GRID`

    wide = console if console.width >= TABLE_WIDTH else Console(width=TABLE_WIDTH, file=console.file)
    wide.print(results_table(summary, rows, top))
    if summary.get("search"):
        from scheduler.report_tables import search_text

        console.print(f"search: {search_text(summary['search'])}")
    console.print(" ".join(f"{k}: {v}" for k, v in summary["counts"].items()))


def _single_run_lock(home: Path) -> None:
    global _run_lock
    handle = _run_lock = open(home / "run.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another `gridfleet run` is using {home}; wait for it or use another directory") from None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C
