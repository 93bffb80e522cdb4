"""`gridfleet studios up|down|status STUDIOS.json`: Lightning AI studios as gridfleet workers.

The logic is in worker/studios.py; this is the command line. docs/studios.md has the whole recipe.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from cli.support import fail

app = typer.Typer(help="Lightning AI studios as workers: start them in batches, stop them when the queue drains.",
                  no_args_is_help=True)

STUDIOS_FILE = typer.Argument(..., metavar="STUDIOS.json", help="the studios (seed 002's studios.json keys)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}



def duration(value: Optional[str], option: str) -> Optional[float]:
    """Seconds from '90', '90s', '30m', '4h' or '3h50m'."""
    if value is None:
        return None
    text = value.strip().lower()
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?[hms])+|\d+(?:\.\d+)?", text):
        fail(f"{option} takes seconds or a duration like 90s, 30m, 4h, 3h50m; got '{value}'")
    return sum(float(number) * _UNITS[unit] for number, unit in re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text))


def _specs(path: Path):
    from common.settings import Settings
    from worker.studios import StudiosFileError, load_studios

    settings = Settings()
    try:
        return load_studios(path, settings.lightning_api_key, settings.lightning_user_id), settings
    except StudiosFileError as exc:
        fail(str(exc))


def _lightning(specs):
    from worker import studios

    try:
        return studios.LightningStudios(specs)
    except RuntimeError as exc:  # lightning-sdk not installed
        fail(str(exc))


@app.command()
def up(
    studios_file: Path = STUDIOS_FILE,
    server: Optional[str] = typer.Option(None, help="API base URL (default: GRIDFLEET_SERVER_URL, else "
                                         "http://127.0.0.1:8000)"),
    token: Optional[str] = typer.Option(None, help="any valid token, to read the queue (default: GRIDFLEET_TOKEN)"),
    batch_size: int = typer.Option(1, min=1, help="studios started together"),
    batch_delay: str = typer.Option("0", help="time from one batch's start to the next (e.g. 4h, seed 002's)"),
    max_run_time: Optional[str] = typer.Option(None, help="each worker's budget (e.g. 3h50m); "
                                               "its job is checkpointed and released before it ends, and the studio "
                                               "is stopped --stop-margin after it"),
    stop_margin: str = typer.Option("5m", help="time after --max-run-time before the studio is stopped"),
    poll: str = typer.Option("30s", help="how often to read the queue and the workers"),
    report_timeout: str = typer.Option("15m", help="warn when a studio's worker has not registered after this long"),
) -> None:
    """Start the studios in batches, show which workers report in, stop them all when nothing is queued or running."""
    import httpx

    from worker import studios

    specs, settings = _specs(studios_file)
    options = studios.UpOptions(
        batch_size=batch_size, batch_delay=duration(batch_delay, "--batch-delay"),
        poll_seconds=max(1.0, duration(poll, "--poll")), max_run_time=duration(max_run_time, "--max-run-time"),
        stop_margin=duration(stop_margin, "--stop-margin"), report_timeout=duration(report_timeout, "--report-timeout"),
    )
    secret = token or (settings.token.get_secret_value() if settings.token else "")
    if not secret:
        fail("no token: pass --token or set GRIDFLEET_TOKEN (any role can read the queue)")
    api = studios.QueueApi(server or settings.server_url, secret)
    try:
        queued, running = api.pending()  # fail here, before any studio costs money
    except (httpx.HTTPError, RuntimeError) as exc:
        api.close()
        fail(f"cannot read the queue from {api.url}: {studios._problem(exc)}", 1)
    typer.echo(f"queue: {queued} queued, {running} running; {len(specs)} studios in {studios_file}")
    client = _lightning(specs)
    launcher = studios.Launcher(client, api, options, echo=typer.echo)
    try:
        outcome = launcher.up(specs)
    except KeyboardInterrupt:
        typer.echo("interrupted: the studios this command started were stopped", err=True)
        raise typer.Exit(130)
    except RuntimeError as exc:  # the API refused the first listing of workers: nothing was started
        fail(str(exc), 1)
    finally:
        api.close()
    silent = [name for name in outcome.started if name not in outcome.reported]
    typer.echo(f"workers reported in from: {', '.join(outcome.reported) or 'none'}"
               + (f"; never reported: {', '.join(silent)}" if silent else ""))
    for name, problem in outcome.failed.items():
        typer.echo(f"studio {name}: {problem}", err=True)
    if outcome.failed:
        raise typer.Exit(1)
    raise typer.Exit(0 if outcome.drained else 3)


@app.command()
def down(studios_file: Path = STUDIOS_FILE) -> None:
    """Stop every studio in the file that is running or starting."""
    from worker import studios

    specs, _ = _specs(studios_file)
    failed = studios.down(_lightning(specs), specs, echo=typer.echo)
    raise typer.Exit(1 if failed else 0)


@app.command()
def status(studios_file: Path = STUDIOS_FILE) -> None:
    """Each studio's state (Running, Stopped, ...)."""
    from worker.studios import _problem

    specs, _ = _specs(studios_file)
    client = _lightning(specs)
    for spec in specs:
        try:
            state = client.status(spec.name)
        except Exception as exc:  # noqa: BLE001 - show every studio
            state = f"unknown ({_problem(exc)})"
        typer.echo(f"{spec.name} ({spec.teamspace}): {state}")
