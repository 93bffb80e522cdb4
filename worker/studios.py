"""Lightning AI studios as gridfleet workers: `gridfleet studios up|down|status studios.json`.

`up` starts the studios listed in studios.json in batches (a delay between batches, as seed 002 did to stay
in each account's free hours), runs each studio's command (by default deploy/studio_bootstrap.sh, which
starts `gridfleet worker`), and then watches the gridfleet API: it shows which studios' workers reported
in (GET /workers), stops a studio when its time budget (--max-run-time plus a margin) is spent, and stops
every studio it started once nothing is queued or running. Unlike seed 002's runner it hears back.

The cloud side is a small interface (`StudioClient`: start / stop / status by studio name);
`LightningStudios` implements it on lightning-sdk (an optional extra: `pip install 'gridfleet[studios]'`),
tests inject a fake. Clock and sleep are injectable too, so batch delays take no time in tests.
"""
from __future__ import annotations

import json
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

# Where studios keep files across restarts; the default command expects a checkout of gridfleet there.
STUDIO_HOME = "/teamspace/studios/this_studio"
DEFAULT_COMMAND = f"bash {STUDIO_HOME}/gridfleet/deploy/studio_bootstrap.sh"
WORKER_LOG = f"{STUDIO_HOME}/gridfleet-worker.log"
ACTIVE_STATES = ("Running", "Pending")  # lightning_sdk.Status values of a studio that costs money


class StudiosFileError(ValueError):
    """studios.json is missing, unreadable or invalid; the message names the file, the entry and the key."""


# ---- studios.json ----------------------------------------------------------------------------------------
class _Entry(BaseModel):
    """One entry of studios.json. Seed 002's keys (camelCase) plus `machine`, `interruptible` and `org`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)
    user: str | None = Field(None, min_length=1, description="Lightning user that owns the teamspace")
    org: str | None = Field(None, min_length=1, description="or: the organization that owns it")
    apiKey: SecretStr | None = None  # noqa: N815 - seed 002's key names
    userID: str | None = Field(None, min_length=1)  # noqa: N815
    teamspaceName: str = Field(..., min_length=1)  # noqa: N815
    studioName: str = Field(..., min_length=1)  # noqa: N815
    commandToRun: str | None = Field(None, min_length=1)  # noqa: N815
    machine: str | None = Field(None, min_length=1, description="e.g. T4, L4, L40S, A100, H100; default: Lightning's")
    interruptible: bool | None = None


KNOWN_KEYS = tuple(_Entry.model_fields)


@dataclass(frozen=True)
class StudioSpec:
    name: str  # the studio's name (studioName); also the name its worker registers with
    entry: str  # the entry's key in studios.json, for messages
    teamspace: str  # "owner/teamspace" when an owner is given, else the bare teamspace name
    api_key: SecretStr = field(repr=False)
    user_id: str = field(repr=False)
    command: str
    machine: str | None = None
    interruptible: bool | None = None


def load_studios(path: Path, api_key: SecretStr | None = None, user_id: str | None = None) -> list[StudioSpec]:
    """The studios in `path`, in file order. `api_key`/`user_id` (from .env) fill entries that leave them out."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudiosFileError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudiosFileError(f"cannot read {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise StudiosFileError(f"{path} is not valid JSON: {exc.msg} at {where}") from None
    if not isinstance(data, dict) or not data:
        raise StudiosFileError(f"{path} must hold a non-empty mapping of entries, e.g. "
                               '{"studio_1": {"teamspaceName": ..., "studioName": ..., ...}}')
    specs: list[StudioSpec] = []
    seen: dict[str, str] = {}
    for key, raw in data.items():
        where = f"{path}: {key}"
        if not isinstance(raw, dict):
            raise StudiosFileError(f"{where} must be a mapping with keys {', '.join(KNOWN_KEYS)}")
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as exc:
            raise StudiosFileError(_explain(where, exc)) from None
        if entry.user and entry.org:
            raise StudiosFileError(f"{where}: give either user or org (the teamspace's owner), not both")
        key_value = entry.apiKey or api_key
        uid = entry.userID or user_id
        if key_value is None or not key_value.get_secret_value():
            raise StudiosFileError(f"{where}: apiKey is missing (put it in the entry or LIGHTNING_API_KEY in .env)")
        if not uid:
            raise StudiosFileError(f"{where}: userID is missing (put it in the entry or LIGHTNING_USER_ID in .env)")
        if entry.studioName in seen:
            raise StudiosFileError(f"{where}: studioName '{entry.studioName}' is also used by {seen[entry.studioName]}")
        seen[entry.studioName] = key
        owner = entry.org or entry.user
        specs.append(StudioSpec(
            name=entry.studioName, entry=key,
            teamspace=f"{owner}/{entry.teamspaceName}" if owner else entry.teamspaceName,
            api_key=key_value, user_id=uid, command=entry.commandToRun or DEFAULT_COMMAND,
            machine=entry.machine, interruptible=entry.interruptible,
        ))
    return specs


def _explain(where: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{name}' (known keys: {', '.join(KNOWN_KEYS)})")
        elif error["type"] == "missing":
            problems.append(f"{name} is missing")
        else:
            problems.append(f"{name}: {error['msg']}")  # pydantic's messages never echo SecretStr values
    return f"{where}: " + "; ".join(problems)


def worker_command(spec: StudioSpec, max_run_time: float | None) -> str:
    """The studio's command, with the worker's name (and time budget) exported for studio_bootstrap.sh."""
    exports = [f"GRIDFLEET_WORKER_NAME={shlex.quote(spec.name)}"]
    if max_run_time is not None:
        exports.append(f"GRIDFLEET_MAX_RUN_TIME={int(max_run_time)}")
    return f"export {' '.join(exports)}; {spec.command}"


# ---- the cloud side ---------------------------------------------------------------------------------------
class StudioClient(Protocol):
    def start(self, name: str, machine: str | None, command: str, max_runtime: int | None = None) -> None:
        """Start the studio (blocking until it runs), then launch `command` in it, detached."""

    def stop(self, name: str) -> None:
        """Stop the studio if it is running or starting; nothing if it is stopped."""

    def status(self, name: str) -> str:
        """One of lightning_sdk.Status's values: NotCreated, Pending, Running, Stopping, Stopped, Failed, ..."""


_credentials_lock = threading.Lock()


def load_lightning_sdk():
    """Import lightning_sdk (an optional extra); a clear error when it is not installed."""
    # lightning_sdk asks PyPI for a newer version at import time, unless this is set before the import.
    os.environ.setdefault("LIGHTNING_DISABLE_VERSION_CHECK", "1")
    try:
        import lightning_sdk
    except ImportError as exc:
        raise RuntimeError("lightning-sdk is not installed: pip install 'gridfleet[studios]' "
                           f"(or pip install lightning-sdk) [{exc}]") from None
    return lightning_sdk


class LightningStudios:
    """StudioClient on lightning-sdk. Each studio may belong to another account (seed 002's apiKey/userID per
    entry); the SDK reads LIGHTNING_API_KEY / LIGHTNING_USER_ID from the environment when it builds its
    client, so they are set (under a lock) only while talking to that studio, then restored."""

    def __init__(self, specs: list[StudioSpec], command_timeout: float = 15.0):
        self.specs = {spec.name: spec for spec in specs}
        self.command_timeout = command_timeout
        self.sdk = load_lightning_sdk()

    @contextmanager
    def _as_owner(self, spec: StudioSpec) -> Iterator[None]:
        keys = {"LIGHTNING_API_KEY": spec.api_key.get_secret_value(), "LIGHTNING_USER_ID": spec.user_id}
        with _credentials_lock:
            before = {k: os.environ.get(k) for k in keys}
            os.environ.update(keys)
            try:
                yield
            finally:
                for k, v in before.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def _studio(self, spec: StudioSpec):
        # create_ok=False: a studio that does not exist cannot hold the checkout its command needs.
        return self.sdk.Studio(name=spec.name, teamspace=spec.teamspace, create_ok=False)

    def start(self, name: str, machine: str | None, command: str, max_runtime: int | None = None) -> None:
        spec = self.specs[name]
        with self._as_owner(spec):
            studio = self._studio(spec)
            if str(studio.status) == "Running":
                return  # up already (an earlier `studios up`): its worker runs; a second one would share the GPU
            studio.start(machine=self.sdk.Machine.from_str(machine) if machine else None,
                         interruptible=spec.interruptible, max_runtime=max_runtime)
            # Output goes to a log in the studio: run_and_detach prints what it collects, and we print nothing
            # the studio says. The command keeps running after run_and_detach returns (exit code None).
            _, code = studio.run_and_detach(f"({command}) >> {WORKER_LOG} 2>&1", timeout=self.command_timeout)
            if code is not None and code != 0:
                raise RuntimeError(f"its command exited with code {code} at once; see {WORKER_LOG} in the studio")

    def stop(self, name: str) -> None:
        spec = self.specs[name]
        with self._as_owner(spec):
            studio = self._studio(spec)
            if str(studio.status) in ACTIVE_STATES:
                studio.stop()

    def status(self, name: str) -> str:
        spec = self.specs[name]
        with self._as_owner(spec):
            return str(self._studio(spec).status)


# ---- the gridfleet side -----------------------------------------------------------------------------------
class QueueApi:
    """What the launcher asks the gridfleet API, over HTTP: queue counts and registered workers."""

    def __init__(self, server_url: str, token: str, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = server_url.rstrip("/")
        self.client = httpx.Client(base_url=self.url + "/api/v1", timeout=timeout, transport=transport,
                                   headers={"Authorization": f"Bearer {token}"})

    def _get(self, path: str) -> dict[str, Any]:
        response = self.client.get(path)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise RuntimeError(f"GET {path}: {response.status_code} {message}")
        return response.json()

    def pending(self) -> tuple[int, int]:
        """(queued, running) jobs. Queued jobs of a paused or cancelled grid do not count: no worker takes them."""
        queued = running = 0
        for grid in self._get("/grids")["grids"]:
            if grid["state"] == "active":
                queued += grid["counts"].get("queued", 0)
            running += grid["counts"].get("running", 0)
        return queued, running

    def workers(self) -> list[dict[str, Any]]:
        return self._get("/workers")["workers"]

    def close(self) -> None:
        self.client.close()


# ---- the launcher -----------------------------------------------------------------------------------------
@dataclass
class UpOptions:
    batch_size: int = 1
    batch_delay: float = 0.0  # seconds from one batch's start to the next one's
    poll_seconds: float = 30.0
    max_run_time: float | None = None  # each worker's budget; the studio is stopped `stop_margin` after it
    stop_margin: float = 300.0
    report_timeout: float = 900.0  # warn about a studio whose worker has not registered after this long


@dataclass
class Started:
    spec: StudioSpec
    at: float  # clock() when it was started
    workers: list[str] = field(default_factory=list)  # ids of its workers that registered since
    stopped: bool = False
    warned: bool = False


@dataclass
class UpOutcome:
    drained: bool = False
    started: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # studios whose worker registered
    failed: dict[str, str] = field(default_factory=dict)  # studio -> what went wrong starting or stopping it
    not_started: list[str] = field(default_factory=list)  # later batches left out: the queue drained first


def _problem(exc: Exception) -> str:
    # Exception text from the SDK or httpx, first line only; our secrets never go into commands or URLs.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


class Launcher:
    def __init__(self, client: StudioClient, api: QueueApi, options: UpOptions,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 echo: Callable[[str], None] = print):
        self.client, self.api, self.options = client, api, options
        self.clock, self.sleep, self.echo = clock, sleep, echo
        self.started: dict[str, Started] = {}
        self.known_workers: set[str] = set()

    def up(self, specs: list[StudioSpec]) -> UpOutcome:
        outcome = UpOutcome()
        size = max(1, self.options.batch_size)
        batches = [specs[i:i + size] for i in range(0, len(specs), size)]
        # Workers registered before we started anything are not ours (an earlier run, other machines).
        try:
            self.known_workers = {w["id"] for w in self.api.workers()}
        except httpx.HTTPError as exc:
            raise RuntimeError(f"cannot list workers at {self.api.url}: {_problem(exc)}") from None
        next_batch_at = self.clock()
        try:
            while True:
                queued, running = self._pending()
                if (queued, running) == (0, 0):
                    outcome.drained = True
                    self.echo("queue drained: nothing queued or running")
                    outcome.not_started = [s.name for batch in batches for s in batch]
                    break
                if batches and self.clock() >= next_batch_at:
                    batch = batches.pop(0)
                    self._start_batch(batch, outcome)
                    next_batch_at = self.clock() + self.options.batch_delay
                    if batches:
                        self.echo(f"next batch ({', '.join(s.name for s in batches[0])}) in "
                                  f"{self.options.batch_delay:.0f} s")
                self._watch_workers(outcome)
                self._stop_expired(outcome)
                if not batches and all(s.stopped for s in self.started.values()):
                    self.echo(f"every studio is stopped or used its budget; {queued} queued and {running} running "
                              "jobs remain: run `gridfleet studios up` again when more time is free")
                    break
                self.sleep(self.options.poll_seconds)
        finally:
            self._stop_all(outcome)  # drained, out of studios, or interrupted (Ctrl-C): never leave ours running
        outcome.reported = [name for name, s in self.started.items() if s.workers]
        return outcome

    def _pending(self) -> tuple[int | None, int | None]:
        try:
            return self.api.pending()
        except (httpx.HTTPError, RuntimeError) as exc:  # a blip must not stop studios that are training
            self.echo(f"cannot read the queue from {self.api.url}: {_problem(exc)}; trying again")
            return None, None

    def _start_batch(self, batch: list[StudioSpec], outcome: UpOutcome) -> None:
        runtime = None
        if self.options.max_run_time is not None:
            runtime = int(self.options.max_run_time + self.options.stop_margin)
        for spec in batch:
            machine = spec.machine or "the default machine"
            self.echo(f"studio {spec.name}: starting on {machine} ({spec.teamspace})")
            try:
                self.client.start(spec.name, spec.machine, worker_command(spec, self.options.max_run_time),
                                  max_runtime=runtime)
            except Exception as exc:  # noqa: BLE001 - one studio that fails to start must not stop the others
                outcome.failed[spec.name] = f"start: {_problem(exc)}"
                self.echo(f"studio {spec.name}: failed to start: {_problem(exc)}")
                self._stop(Started(spec=spec, at=self.clock()), outcome, keep_failure=True)  # it may be up anyway
                continue
            self.started[spec.name] = Started(spec=spec, at=self.clock())
            outcome.started.append(spec.name)
            self.echo(f"studio {spec.name}: started; its command runs, output in {WORKER_LOG} there")

    def _watch_workers(self, outcome: UpOutcome) -> None:
        try:
            workers = self.api.workers()
        except (httpx.HTTPError, RuntimeError) as exc:
            self.echo(f"cannot list workers: {_problem(exc)}")
            return
        for worker in workers:
            if worker["id"] in self.known_workers:
                continue
            studio = self.started.get(worker["name"])
            if studio is None:
                continue  # someone else's worker
            self.known_workers.add(worker["id"])
            studio.workers.append(worker["id"])
            self.echo(f"studio {studio.spec.name}: worker {worker['id']} reported in "
                      f"(host {worker.get('host')}, trainers: {', '.join(worker.get('trainers') or [])})")
        for studio in self.started.values():
            late = self.clock() - studio.at > self.options.report_timeout
            if not studio.workers and not studio.stopped and not studio.warned and late:
                studio.warned = True
                self.echo(f"studio {studio.spec.name}: no worker reported in after "
                          f"{self.options.report_timeout:.0f} s; look at {WORKER_LOG} in the studio")

    def _stop_expired(self, outcome: UpOutcome) -> None:
        if self.options.max_run_time is None:
            return
        budget = self.options.max_run_time + self.options.stop_margin
        for studio in self.started.values():
            if not studio.stopped and self.clock() - studio.at >= budget:
                self.echo(f"studio {studio.spec.name}: its {budget:.0f} s are up")
                self._stop(studio, outcome)

    def _stop_all(self, outcome: UpOutcome) -> None:
        for studio in self.started.values():
            if not studio.stopped:
                self._stop(studio, outcome)

    def _stop(self, studio: Started, outcome: UpOutcome, keep_failure: bool = False) -> None:
        studio.stopped = True
        try:
            self.client.stop(studio.spec.name)
        except Exception as exc:  # noqa: BLE001 - try every studio; report the ones left running
            if keep_failure:  # the start's failure is the one to report
                outcome.failed[studio.spec.name] += f"; stop: {_problem(exc)}"
            else:
                outcome.failed[studio.spec.name] = f"stop: {_problem(exc)}"
            self.echo(f"studio {studio.spec.name}: FAILED to stop ({_problem(exc)}); stop it by hand")
            return
        self.echo(f"studio {studio.spec.name}: stopped")


def down(client: StudioClient, specs: list[StudioSpec], echo: Callable[[str], None] = print) -> dict[str, str]:
    """Stop every studio in the file that runs or starts; returns {studio: problem} for those that failed."""
    failed: dict[str, str] = {}
    for spec in specs:
        try:
            client.stop(spec.name)
        except Exception as exc:  # noqa: BLE001 - try every studio
            failed[spec.name] = _problem(exc)
            echo(f"studio {spec.name}: FAILED to stop ({_problem(exc)})")
            continue
        echo(f"studio {spec.name}: stopped (or was not running)")
    return failed
