"""The `gridfleet` command: serve, submit, status, resume-job, import, refine, token.

Heavy modules (FastAPI, uvicorn, SQLAlchemy, rich) are imported inside the commands that use them.
Bad input (a missing file, YAML that does not parse) is one line on stderr and exit code 2; a request
the server refuses is its message on stderr and exit code 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(help="Run grids of training configs on a fleet of GPU workers.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
token_app = typer.Typer(help="API tokens (stored hashed; each token is shown once, when created).",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")
from cli.support import (  # noqa: E402
    EXIT_FAILED, GANG_HELP, api_client, api_request, db_problem, fail, load_settings, trainer_names, worker_token,
)
from cli.studios import app as studios_app  # noqa: E402 - imports only typer until a command runs

app.add_typer(studios_app, name="studios")
from cli.fleet import app as fleet_app  # noqa: E402 - imports only typer until a command runs

app.add_typer(fleet_app, name="fleet")
from cli.analyze import analyze as analyze_command  # noqa: E402 - imports only typer until a command runs

app.command("analyze")(analyze_command)

SERVER_HELP = "API base URL (default: GRIDFLEET_SERVER_URL, else http://127.0.0.1:8000)"  # tests/unit/test_cli_help.py
# ---- serve ---------------------------------------------------------------------------------------
@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="interface to listen on (default: GRIDFLEET_HOST, else 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default: GRIDFLEET_PORT, else 8000)"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log",
                                    help="a log line per HTTP request (--no-access-log: quiet, with many workers "
                                         "heartbeating)"),
) -> None:
    """Run the API server (one process). Migrates the database and makes sure an admin token exists."""
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from api import tokens
    from api.app import bootstrap_admin, create_app
    from common.db import make_engine, migrate

    settings = load_settings()
    try:
        migrate(settings.database_url)
        engine = make_engine(settings.database_url)
        try:
            if bootstrap_admin(engine, settings) == "missing":
                _, token = tokens.create_token(engine, "admin", "admin (made by gridfleet serve)")
                # Printed once, to stdout only: it is stored hashed and cannot be shown again.
                typer.echo(f"admin token (shown once; store it now, e.g. GRIDFLEET_ADMIN_TOKEN in .env): {token}")
        finally:
            engine.dispose()
        application = create_app(settings)
    except SQLAlchemyError as exc:
        fail(f"cannot use the database: {db_problem(exc)}", EXIT_FAILED)
    host, port = host or settings.host, settings.port if port is None else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    typer.echo(f"dashboard: http://{shown}:{port}/  (sign in with a token; API docs at /docs)", err=True)
    uvicorn.run(application, host=host, port=port, log_level=log_level, access_log=access_log)


# ---- submit --------------------------------------------------------------------------------------
FORCE_NEW_RUN = typer.Option(False, "--forcenewrun", "--force-new-run",
                             help="seed 002 conf.json: start a new run instead of continuing the stored one")


def load_grid_file(path: Path, force_new_run: bool = False) -> dict[str, Any]:
    """The mapping in a YAML or JSON grid file (or seed 002's conf.json or seed 003's config.yml, each made a
    one-job grid); exits 2 with one line on any problem."""
    import yaml

    if not path.is_file():
        fail(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {path}: {exc}")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        fail(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        fail(f"{path} is not valid YAML: {problem}{where}")
    if not isinstance(data, dict):
        fail(f"{path} must hold a mapping (name, trainer, config, axes, ...), not {type(data).__name__}")
    if "trainer" not in data and "config" not in data:
        from worker.trainers import perturbation, snn_ddqn  # imports torch: only for a file that is no grid spec

        if snn_ddqn.is_seed_conf(data):
            return snn_ddqn.grid_from_seed_conf(data, force_new_run)
        if perturbation.is_seed_conf(data):  # seed 003's config.yml
            return perturbation.grid_from_seed_conf(data)
    return data


@app.command()
def submit(
    grid_file: Path = typer.Argument(..., metavar="GRID.yaml|GRID.json", help="the grid spec"),
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    token: Optional[str] = typer.Option(None, help="a submit or admin token (default: GRIDFLEET_TOKEN)"),
    force_new_run: bool = FORCE_NEW_RUN,
) -> None:
    """Submit a grid (or seed 002's conf.json). Re-submitting the same name adds only the configs not already
    there."""
    data = load_grid_file(grid_file, force_new_run)
    try:
        body = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        fail(f"{grid_file} holds a value JSON cannot carry (NaN, infinity, a date?): {exc}")
    client, url = api_client(server, token)
    with client:
        reply = api_request(client, url, "POST", "/grids", content=body,
                         headers={"Content-Type": "application/json"}).json()
    if isinstance(data.get("search"), dict):  # its jobs come from the sampler, a few at a time
        typer.echo(f"grid {reply['name']}: a {data['search'].get('sampler', 'tpe')} search of {reply['total']} trials "
                   f"(`gridfleet status {reply['name']}` shows how far it got)")
        return
    typer.echo(f"grid {reply['name']}: {reply['created']} created, {reply['existing']} already existed")


# ---- status and plots (the local database, or a server) ------------------------------------------------
LOCAL = typer.Option(False, "--local", help="read this machine's database (DATABASE_URL, else "
                     ".gridfleet/gridfleet.db) even when GRIDFLEET_SERVER_URL is set")


def _grid_source(server: Optional[str], token: Optional[str], local: bool):
    """The database `gridfleet run` writes (no token) unless a server is named by --server or GRIDFLEET_SERVER_URL."""
    from contextlib import nullcontext

    from cli import status_view as view

    settings = load_settings()
    if local or (server is None and "server_url" not in settings.model_fields_set):
        try:
            return view.LocalGrids(settings.database_url), nullcontext()
        except view.SourceError as exc:
            fail(str(exc), EXIT_FAILED)
    client, url = api_client(server, token)
    return view.RemoteGrids(lambda path, params=None: api_request(client, url, "GET", path, params=params).json()), client


def _read(call, *args):
    from cli.status_view import SourceError

    try:
        return call(*args)
    except SourceError as exc:
        fail(str(exc), EXIT_FAILED)


@app.command()
def status(
    grid: Optional[str] = typer.Argument(None, help="a grid name or id; all grids when left out"),
    top: int = typer.Option(10, min=0, help="show the best N jobs of GRID (0: all)"),
    as_json: bool = typer.Option(False, "--json", help="print everything (summary, configs, results) as JSON"),
    external_id: Optional[str] = typer.Option(
        None, "--external-id", "--seed-config-id",
        help="list the jobs (of GRID, or of every grid) with this external id, e.g. seed 001's config id"),
    local: bool = LOCAL,
    server: Optional[str] = typer.Option(None, help="API base URL; without it (and without GRIDFLEET_SERVER_URL) "
                                         "the local database is read"),
    token: Optional[str] = typer.Option(None, help="any valid token, for a server (default: GRIDFLEET_TOKEN)"),
) -> None:
    """Progress of all grids, or one grid's summary and its best jobs (state, swept keys, metrics); or the jobs
    with an external id."""
    from rich.console import Console

    from scheduler import report_tables as view

    console = Console(width=max(view.TABLE_WIDTH, Console().width))
    source, connection = _grid_source(server, token, local)
    with connection:
        if external_id is not None:
            jobs = _read(source.jobs, external_id, grid)
            if not jobs:
                fail(f"no job with external id {external_id}" + (f" in grid {grid}" if grid else ""), EXIT_FAILED)
            out: Any = jobs
            shown = [view.jobs_table(external_id, jobs)]
        elif grid is None:
            out = _read(source.grids)
            shown = [view.grids_table(out)]
        else:
            summary, rows = _read(source.summary, grid), _read(source.results, grid)
            out = {"grid": summary, "results": rows}
            shown = [view.summary_table(summary), view.results_table(summary, rows, top or None)]
    source.close()
    if as_json:
        typer.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    for table in shown:
        console.print(table)


@app.command("resume-job")
def resume_job(
    job_id: int = typer.Argument(..., min=1, help="the job's id (`gridfleet status GRID` lists them)"),
    local: bool = LOCAL,
    server: Optional[str] = typer.Option(None, help="API base URL; without it (and without GRIDFLEET_SERVER_URL) "
                                         "the local database is changed"),
    token: Optional[str] = typer.Option(None, help="a submit or admin token, for a server (default: GRIDFLEET_TOKEN)"),
) -> None:
    """Queue a pruned (or cancelled) job again: it continues from its checkpoint, and no prune rule stops it
    again (docs/early_stopping.md)."""
    settings = load_settings()
    if local or (server is None and "server_url" not in settings.model_fields_set):
        from sqlalchemy.exc import SQLAlchemyError

        from common.db import make_engine
        from scheduler import grids

        engine = make_engine(settings.database_url)
        try:
            state = grids.resume_job(engine, job_id)
        except (grids.NotFound, grids.Conflict) as exc:
            fail(str(exc), EXIT_FAILED)
        except SQLAlchemyError as exc:
            fail(f"cannot change the database: {db_problem(exc)}", EXIT_FAILED)
        finally:
            engine.dispose()
    else:
        client, url = api_client(server, token)
        with client:
            state = api_request(client, url, "POST", f"/jobs/{job_id}/resume").json()["state"]
    typer.echo(f"job {job_id}: {state} (continues from its checkpoint; not pruned again)")


@app.command()
def plots(
    grid: str = typer.Argument(..., help="a grid name or id"),
    out: Path = typer.Option(Path("."), help="folder for the PNG files"),
    below: Optional[float] = typer.Option(None, help="also plot the runs whose objective is below this "
                                          "(seed 001: 1.9, the loss of a net that uses its memory)"),
    metric: str = typer.Option("loss", help="the metric whose curves are drawn"),
    local: bool = LOCAL,
    server: Optional[str] = typer.Option(None, help="API base URL; without it (and without GRIDFLEET_SERVER_URL) "
                                         "the local database is read"),
    token: Optional[str] = typer.Option(None, help="any valid token, for a server (default: GRIDFLEET_TOKEN)"),
) -> None:
    """Seed 001's plots of a grid as PNG: all runs' curves, the best runs' curves with legends naming what
    differs, the objective against each swept key, and with --below the same for the runs below a value."""
    from common.plots.png import write_grid_plots

    source, connection = _grid_source(server, token, local)
    with connection:
        summary, rows = _read(source.summary, grid), _read(source.results, grid)
        written = write_grid_plots(rows, lambda job_id: _read(source.metrics, job_id), summary["objective"], out,
                                   summary["name"], below=below, curve_metric=metric)
    source.close()
    for path in written:
        typer.echo(str(path))


# ---- import and refine (seed 001's own files and its next stage) ------------------------------------------
@app.command("import")
def import_results(
    grid_file: Path = typer.Argument(..., metavar="GRID.yaml", help="the grid: trainer gated_rnn, its training "
                                     "config (batch, history, steps, corpus) and name"),
    configs: Path = typer.Argument(..., metavar="rnn_configs.json", help="the seed's config list"),
    results: list[Path] = typer.Argument(..., metavar="RESULTS...", help="result files or folders "
                                         "(results_01_all/)"),
    log_every: int = typer.Option(50, min=1, help="the seed's log_frequency when its files were written"),
    local: bool = typer.Option(False, "--local", help="write into this machine's database (DATABASE_URL, else "
                               ".gridfleet/gridfleet.db: the one `gridfleet run` uses) instead of through the API"),
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    token: Optional[str] = typer.Option(None, help="a submit or admin token (default: GRIDFLEET_TOKEN)"),
) -> None:
    """Import seed 001's rnn_configs.json and result files into a grid: its configs become the grid's jobs,
    the finished ones are stored as succeeded with their results (no training), only the rest will run.
    Importing again changes nothing; a job that already ran here keeps its own result (skipped)."""
    from worker import trainers
    from worker.trainers import gated_rnn, slmfun

    data = load_grid_file(grid_file)
    if data.get("trainer") != "gated_rnn":
        fail(f"{grid_file}: import reads seed 001's files; the grid's trainer must be gated_rnn, "
             f"not {data.get('trainer')!r}")
    try:
        rnn = slmfun.read_configs(configs)
        finished, claims = slmfun.read_results(results)
        body = slmfun.import_body(data, rnn, finished, lambda c: trainers.parse_config("gated_rnn", c),
                                  gated_rnn.dataset_name, log_every)
    except (slmfun.SeedFileError, trainers.InvalidConfig) as exc:
        fail(str(exc))
    if local:
        reply = _import_locally(body, grid_file)
    else:
        client, url = api_client(server, token)
        with client:
            reply = api_request(client, url, "POST", "/grids/import", json=body).json()
    typer.echo(f"grid {reply['name']}: {reply['total']} jobs ({reply['created']} created, {reply['existing']} "
               f"already there); {reply['imported']} imported as done, {len(reply['skipped'])} skipped")
    for skip in reply["skipped"]:
        typer.echo(f"  skipped job {skip['job_id']}: {skip['reason']}")
    if claims:
        typer.echo(f"{len(claims)} result file(s) hold only the seed's claim (a run that never finished); "
                   "those configs will run: " + ", ".join(p.name for p in claims[:5])
                   + (" ..." if len(claims) > 5 else ""))


def _import_locally(body: dict[str, Any], grid_file: Path) -> dict[str, Any]:
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from common.db import make_engine, migrate
    from scheduler.grids import DoneJob, submit_grid
    from scheduler.spec import GridError, GridSpec
    from worker import trainers

    try:
        spec = GridSpec.model_validate(body["grid"])
    except ValidationError as exc:
        fail(f"{grid_file}: " + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))
    settings = load_settings()
    try:
        migrate(settings.database_url)
        engine = make_engine(settings.database_url)
        try:
            out = submit_grid(engine, spec, trainers.validate_config, external_id=trainers.external_id,
                              fuse_key=trainers.fuse_key,
                              done=[DoneJob(**d) for d in body["done"]])
        finally:
            engine.dispose()
    except (GridError, trainers.InvalidConfig) as exc:
        fail(f"{grid_file}: {exc}")
    except SQLAlchemyError as exc:
        fail(f"cannot use the database: {db_problem(exc)}", EXIT_FAILED)
    return {"name": out.name, "total": out.total, "created": out.created, "existing": out.existing,
            "imported": out.imported, "skipped": out.skipped}


@app.command()
def refine(
    grid: str = typer.Argument(..., help="the finished (or partly finished) grid, by name or id"),
    more_sets: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...", help="more changes"),
    top: str = typer.Option("10%", help="the best N% (rounded down, at least 1) or N of the succeeded jobs"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE to change in every chosen config "
                                             "(VALUE as YAML: 512, true, [1, 2]); repeat, or list several after it"),
    by: Optional[str] = typer.Option(None, help="rank by min:METRIC or max:METRIC (default: the grid's objective)"),
    name: Optional[str] = typer.Option(None, help="the new grid's name (default: made from the parent and changes)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the new grid spec as JSON, submit nothing"),
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    token: Optional[str] = typer.Option(None, help="a submit or admin token (default: GRIDFLEET_TOKEN)"),
) -> None:
    """Submit the top of GRID by its objective again with changed keys, as a new grid linked to GRID
    (seed 001's next stage: `gridfleet refine seed-001 --top 10% --set state_size=512 n_layers=3 steps=50000`).
    A bad key or value is the trainer's 422, naming the field."""
    from urllib.parse import quote

    from scheduler import refine as r

    try:
        amount = r.parse_top(top)
        changes = r.parse_sets([*(sets or []), *(more_sets or [])])
    except r.RefineError as exc:
        fail(str(exc))
    if not changes:
        fail("nothing to change: give --set KEY=VALUE (e.g. --set state_size=512 n_layers=3)")
    client, url = api_client(server, token)
    with client:
        summary = api_request(client, url, "GET", f"/grids/{quote(grid, safe='')}").json()
        objective = by or summary["objective"]
        if not objective:
            fail(f"grid {summary['name']} has no objective; pass --by min:METRIC or --by max:METRIC")
        rows = api_request(client, url, "GET", f"/grids/{quote(grid, safe='')}/results").json()["results"]
        try:
            chosen = r.choose(rows, objective, amount)
        except r.RefineError as exc:  # the grid has nothing to refine (yet)
            fail(f"grid {summary['name']}: {exc}", EXIT_FAILED)
        try:
            spec = r.refined_spec(summary, chosen, changes, name)
        except r.RefineError as exc:
            fail(f"grid {summary['name']}: {exc}")
        if dry_run:
            typer.echo(json.dumps(spec, indent=2, sort_keys=True))
            return
        reply = api_request(client, url, "POST", "/grids", json=spec).json()
    typer.echo(f"grid {reply['name']} (refined from {summary['name']}: top {len(chosen)} by {objective}): "
               f"{reply['created']} created, {reply['existing']} already existed")


# ---- run (embedded) and worker -----------------------------------------------------------------
@app.command()
def pull(
    grid: str = typer.Argument(..., help="grid name or id"),
    dest: Optional[Path] = typer.Option(None, help="where to put the files (default: ./<grid name>)"),
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    token: Optional[str] = typer.Option(None, help="any API token (default: GRIDFLEET_TOKEN)"),
) -> None:
    """Download a grid's results (CSV, JSON) and, per succeeded job, its final model and job files."""
    from cli.pull import pull_grid

    settings = load_settings()
    client, url = api_client(server, token)
    with client:
        summary = api_request(client, url, "GET", f"/grids/{grid}").json()
        rows = api_request(client, url, "GET", f"/grids/{grid}/results").json()["results"]
    target = dest or Path(summary["name"])
    pulled = pull_grid(summary, rows, target, settings.store_options(), settings.home / "checkpoints")
    for job in pulled:
        typer.echo(f"job {job.job_id}: {', '.join(job.files) or 'no files'}")
        for problem in job.missing:
            typer.echo(f"  missing {problem}", err=True)
    complete = sum(1 for job in pulled if not job.missing)
    typer.echo(f"{target}: results.csv, results.json; {complete}/{len(pulled)} succeeded job(s) complete")
    if complete < len(pulled):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def run(
    grid_file: Path = typer.Argument(..., metavar="GRID.yaml|GRID.json", help="the grid spec"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, max=64, help="local worker processes"),
    force_new_run: bool = FORCE_NEW_RUN,
    gang: Optional[int] = typer.Option(None, min=1, max=1024, help=GANG_HELP),
) -> None:
    """Train a grid on this machine (SQLite under ./.gridfleet/): live progress, then a results table, a CSV
    and a PNG. Ctrl-C preempts with checkpoints; running the same command again continues."""
    from pydantic import ValidationError
    from rich.console import Console

    from scheduler.spec import GridError, GridSpec
    from worker import trainers
    from worker.local import run_grid

    data = load_grid_file(grid_file, force_new_run)
    try:
        spec = GridSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'grid'}: {e['msg']}" for e in exc.errors())
        fail(f"{grid_file}: {problems}")
    try:
        settings = load_settings()
        if gang is not None:
            settings = settings.model_copy(update={"gang_size": gang})
        outcome = run_grid(spec, workers, settings, Console())
    except (GridError, trainers.UnknownTrainer, trainers.InvalidConfig) as exc:
        fail(f"{grid_file}: {exc}")
    raise typer.Exit(0 if outcome.finished else 3)


@app.command()
def worker(
    server: Optional[str] = typer.Option(None, help=SERVER_HELP),
    token: Optional[str] = typer.Option(None, help="a worker or admin token (default: GRIDFLEET_TOKEN)"),
    name: Optional[str] = typer.Option(None, help="a label for this worker (default: the host name)"),
    trainers: Optional[str] = typer.Option(None, help="comma-separated trainers to run (default: all known)"),
    gpus: Optional[float] = typer.Option(None, min=0.0, help="GPU capacity offered (default: GPUs seen)"),
    max_jobs: Optional[int] = typer.Option(None, min=1, help="stop after this many jobs"),
    max_run_time: Optional[float] = typer.Option(None, min=1.0, help="seconds this worker may live"),
    grace: float = typer.Option(30.0, min=0.0, help="seconds a preempted job gets to checkpoint"),
    min_job_time: float = typer.Option(120.0, min=0.0, help="with --max-run-time: claim no job when less "
                                       "than this many seconds are left (at least --grace)"),
    self_update: Optional[bool] = typer.Option(
        None, "--self-update/--no-self-update",
        help="between jobs, follow --git-ref and re-exec on each new commit (default: GRIDFLEET_SELF_UPDATE)"),
    git_remote: Optional[str] = typer.Option(
        None, help="remote for self-update and pinned code_revs (default: GRIDFLEET_GIT_REMOTE or .env "
                   "code_base_link, else origin)"),
    git_ref: Optional[str] = typer.Option(None, help="ref --self-update follows (default: the remote's HEAD)"),
    update_interval: Optional[float] = typer.Option(None, min=0.0, help="seconds between self-update fetches"),
    warm_starts: Optional[bool] = typer.Option(
        None, "--warm-starts/--cold-starts",
        help="fork jobs from a pre-imported process, or spawn each anew (default: GRIDFLEET_WARM_STARTS, on)"),
    gang: Optional[int] = typer.Option(None, min=1, max=1024, help=GANG_HELP),
) -> None:
    """Pull jobs from the API and train them, one at a time, each in a child process."""
    from worker import logs
    from worker.agent import Agent, AgentOptions
    from worker.client import ApiClient

    logs.configure()
    settings = load_settings()
    secret = worker_token(settings, token)
    options = AgentOptions(
        trainers=trainer_names(trainers),
        gpus=gpus, max_jobs=max_jobs, max_run_time=max_run_time, grace_seconds=grace, home=settings.home,
        stores=settings.store_options(),
        warm_starts=settings.warm_starts if warm_starts is None else warm_starts,
        max_gang=settings.gang_size if gang is None else gang,
    )
    if name:
        options.name = name
    options.min_job_time = max(min_job_time, grace)  # a job claimed with less than grace left is preempted at once
    from worker import self_update as updates

    try:
        code_cache, updater = updates.prepare(
            Path(updates.__file__).parent, settings.home, remote=git_remote or settings.git_remote,
            ref=git_ref or settings.git_ref,
            enabled=settings.self_update if self_update is None else self_update,
            interval=settings.self_update_interval if update_interval is None else update_interval,
            trainers=options.trainers)
    except updates.UpdateFailed as exc:
        fail(str(exc))
    options.can_pin_code = code_cache is not None
    client = ApiClient(server or settings.server_url, secret, finish_retry_for=settings.finish_retry_for)
    raise typer.Exit(Agent(client, options, updater=updater, code_cache=code_cache).run())


# ---- token ---------------------------------------------------------------------------------------
@token_app.command("create")
def token_create(
    role: str = typer.Option(..., help="admin, submit or worker"),
    name: Optional[str] = typer.Option(None, help="a label to recognise the token by (default: the role)"),
) -> None:
    """Create a token directly in the database (DATABASE_URL, else .gridfleet/gridfleet.db) and print it once."""
    from sqlalchemy.exc import SQLAlchemyError

    from api import tokens
    from common.db import make_engine, migrate

    if role not in tokens.ROLES:
        fail(f"--role must be one of {', '.join(tokens.ROLES)}; got '{role}'")
    if name is not None and not 1 <= len(name) <= tokens.MAX_NAME:
        fail(f"--name must be 1 to {tokens.MAX_NAME} characters")
    settings = load_settings()
    try:
        migrate(settings.database_url)
        engine = make_engine(settings.database_url)
        try:
            _, token = tokens.create_token(engine, role, name)
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        fail(f"cannot use the database: {db_problem(exc)}", EXIT_FAILED)
    typer.echo(token)
    typer.echo(f"({role} token; shown once, only its hash is stored)", err=True)


from cli.help import tidy  # noqa: E402 - after every command: the help pages read as one line a paragraph

tidy(app)


def main() -> None:  # pragma: no cover - `python -m cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
