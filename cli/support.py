"""What every `gridfleet` command shares: exit codes, the one-line error, settings, the API client.

Here and not in cli/main.py so that the command modules beside it (fleet, studios, analyze) import it
without importing main, which imports them.
"""
from __future__ import annotations

from typing import NoReturn, Optional

import typer

EXIT_FAILED = 1  # the server refused or could not be reached
EXIT_USAGE = 2  # bad input on our side


def load_settings():
    from common.settings import Settings

    return Settings()


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def db_problem(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def api_client(server: Optional[str], token: Optional[str]):
    import httpx

    settings = load_settings()
    url = (server or settings.server_url).rstrip("/")
    secret = token or (settings.token.get_secret_value() if settings.token else "")
    if not secret:
        fail("no token: pass --token or set GRIDFLEET_TOKEN (an admin makes one with "
             "`gridfleet token create --role submit`)")
    return httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {secret}"}, timeout=60.0), url


def api_request(client, url: str, method: str, path: str, **kwargs):
    import httpx

    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the server at {url}: {type(exc).__name__}: {exc}", EXIT_FAILED)
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = error["message"]
            for field in error.get("fields") or []:
                if field["field"] not in message:
                    message += f"\n  {field['field']}: {field['message']}"
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        fail(f"{response.status_code}: {message}", EXIT_FAILED)
    return response


def worker_token(settings, token: Optional[str]) -> str:
    """--token, else GRIDFLEET_TOKEN; exits 2 saying how to make one when there is none."""
    secret = token or (settings.token.get_secret_value() if settings.token else "")
    if not secret:
        fail("no token: pass --token or set GRIDFLEET_TOKEN (an admin makes one with "
             "`gridfleet token create --role worker`)")
    return secret


def trainer_names(trainers: Optional[str]) -> Optional[list[str]]:
    """'a, b' -> ['a', 'b']; None (every trainer this install knows) when not given."""
    return [t.strip() for t in trainers.split(",") if t.strip()] if trainers else None


GANG_HELP = ("claim up to this many jobs of one grid and fuse key at once and train them as one model, when "
             "the trainer can (default: GRIDFLEET_GANG_SIZE, 8); 1: one job at a time")
