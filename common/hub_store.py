"""The `hf://owner/repo[@branch]` checkpoint store: local first (LocalStore), then one Hub commit per save.

A pointer names the file in the repo and the commit that holds it:
    {"uri": "hf://owner/repo/grid-1/job-2/ckpt-000000000010.pt", "revision": <commit sha>, "step", "time"}
so a load on any machine gets exactly that version, even after later commits to the branch.

Tokens arrive as SecretStr arguments and are unwrapped only at the call into huggingface_hub. Errors from
huggingface_hub are re-raised as HubStoreError with a message we build (status, operation, repo), never the
original exception text or its request, so no token can leak into logs or error messages.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from pydantic import SecretStr

from common.checkpoints import LocalStore, deserialize
from common.store_uri import job_folder, normalize_hf_uri, parse_hf_uri, split_hf_pointer

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUSES = {429, 500, 502, 503, 504}


class HubStoreError(RuntimeError):
    """A Hub call failed; the message names the operation and status, never a token."""


class HubStore:
    def __init__(
        self,
        uri: str,
        local_root: str | Path,
        *,
        write_token: SecretStr | None = None,
        read_token: SecretStr | None = None,
        endpoint: str | None = None,
        keep: int = 3,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        self.repo_id, self.branch = parse_hf_uri(uri)
        self.uri = normalize_hf_uri(uri)
        self.local = LocalStore(local_root, keep=keep)
        self.cache_dir = self.local.root / ".hub-cache"
        self.endpoint = endpoint
        self._write_token = write_token
        self._read_token = read_token or write_token
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._repo_ready = False

    def __repr__(self) -> str:
        return f"HubStore(hf://{self.repo_id}@{self.branch}, local={self.local.root})"

    @staticmethod
    def path_in_repo(grid_id: int, job_id: int, step: int) -> str:
        return f"{job_folder(grid_id, job_id)}/ckpt-{step:012d}.pt"

    def _api(self, token: SecretStr | None) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=token.get_secret_value() if token else None)

    # -- public API ------------------------------------------------------------------------------------
    def save(self, grid_id: int, job_id: int, step: int, state: Any) -> dict[str, Any]:
        """Write locally (durable), upload as one commit, return the Hub pointer with the commit sha."""
        local_pointer = self.local.save(grid_id, job_id, step, state)
        path = self.path_in_repo(grid_id, job_id, step)
        sha = self.upload({path: Path(local_pointer["uri"][len("local:"):])},
                          f"checkpoint grid {grid_id} job {job_id} step {step}")
        return self.pointer(path, sha, step, local_pointer["time"])

    def pointer(self, path: str, sha: str, step: int, saved_at: float) -> dict[str, Any]:
        return {"uri": f"hf://{self.repo_id}/{path}", "revision": sha, "step": step, "time": saved_at}

    def upload(self, files: dict[str, Path], message: str) -> str | None:
        """Commit {path in repo: local file} to the branch in one commit (retried); return the commit sha.

        The job's child prunes old checkpoints while an upload waits for the Hub (retries, an outage). A file
        gone by the time of an attempt is left out and removed from `files`, so the caller records pointers
        only for what the commit holds (newer checkpoints of that job are queued); None when none is left.
        Each file is opened for the attempt, so one pruned while it uploads is still read whole."""
        self.ensure_repo()
        api = self._api(self._write_token)

        def commit() -> str | None:
            with ExitStack() as opened:
                operations = []
                for path, local in list(files.items()):
                    try:
                        handle = opened.enter_context(open(local, "rb"))
                    except FileNotFoundError:
                        del files[path]
                        continue
                    operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=handle))
                if not operations:
                    return None
                return api.create_commit(self.repo_id, operations=operations, commit_message=message,
                                         revision=self.branch).oid

        return self._retry(f"upload of {len(files)} file(s)", commit)

    def load(self, pointer: dict[str, Any]) -> Any:
        """The checkpoint a pointer names: the local copy when there is one, else that exact Hub revision."""
        repo_id, path = split_hf_pointer(pointer["uri"])
        if repo_id != self.repo_id:
            raise ValueError(f"checkpoint {pointer['uri']} is not in this store's repo {self.repo_id}")
        local_path = self.local.root / path
        if local_path.exists():
            return deserialize(local_path.read_bytes())
        return deserialize(self.download(path, pointer["revision"]).read_bytes())

    def download(self, path: str, revision: str | None = None) -> Path:
        """One file of the repo at `revision` (default: the branch head), into the cache; its local path."""
        api = self._api(self._read_token)
        revision = revision or self.branch

        def download() -> str:
            return api.hf_hub_download(self.repo_id, path, revision=revision, cache_dir=str(self.cache_dir))

        return Path(self._retry(f"download of {path}@{revision[:12]}", download))

    def ensure_repo(self) -> None:
        if self._repo_ready:
            return
        api = self._api(self._write_token)
        self._retry(
            f"creation of repo {self.repo_id}",
            lambda: api.create_repo(self.repo_id, private=True, exist_ok=True),
        )
        self._repo_ready = True

    # -- helpers ---------------------------------------------------------------------------------------
    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Run `call`, retrying 429 (after Retry-After), 5xx and network errors with bounded backoff."""
        for attempt in range(1, self.max_attempts + 1):
            # Only plain values leave the except blocks, so the HubStoreError carries no reference to the
            # original exception (whose request holds the Authorization header).
            status, delay, kind = None, None, None
            try:
                return call()
            except (HfHubHTTPError, httpx2.TransportError, LocalEntryNotFoundError) as exc:
                # hf_hub_download reports a failed HEAD (5xx, 403, network) as LocalEntryNotFoundError
                # ("not reachable and not cached"), with the real error as its cause.
                if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
                    exc = exc.__cause__
                if isinstance(exc, HfHubHTTPError) and exc.response is not None:
                    status = exc.response.status_code
                    retryable = status in RETRY_STATUSES
                    delay = _retry_after(exc.response) if status == 429 else None
                else:  # network error, or a FileMetadataError from a server that is not Hub-compatible
                    retryable = isinstance(exc, (httpx2.TransportError, LocalEntryNotFoundError))
                    kind = type(exc).__name__
            if not retryable or attempt == self.max_attempts:
                raise HubStoreError(_describe(what, self.repo_id, status, attempt, kind))
            if delay is None:
                delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s: %s, retrying in %.2fs (attempt %d/%d)", what,
                        f"HTTP {status}" if status else kind, delay, attempt, self.max_attempts)
            time.sleep(delay)
        raise AssertionError("unreachable")


@dataclass
class PendingFile:
    local: Path
    step: int | None  # a checkpoint's step; None for other files (config.json, result.json, README.md)
    saved_at: float
    meta: dict[str, Any] = field(default_factory=dict)  # handed to on_uploaded (e.g. job and attempt ids)


class Uploader:
    """Uploads files already written locally, all pending ones as one Hub commit every `interval` seconds.

    The Hub allows about 128 commits per repo per hour for the whole fleet, so a worker never commits per
    checkpoint. A newer checkpoint of a job supersedes its older pending one (only the newest is worth a
    commit). `on_uploaded(pointer, meta)` runs for each checkpoint once its commit exists: that is when a job
    row may record it. A failed batch stays pending (the local copies are kept) and is tried again at the
    next flush. A pending file that is gone locally (pruned: superseded by a newer step) is dropped.

    With a `journal` file the pending list survives the process: an agent killed with kill -9 finds it at
    its next start on the same machine and uploads what was left (`Uploader.resume`).
    """

    def __init__(self, store: HubStore, interval: float = 300.0,
                 on_uploaded: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
                 journal: Path | None = None):
        self.store = store
        self.interval = interval
        self.on_uploaded = on_uploaded
        self.journal = journal
        self._pending: dict[str, PendingFile] = {}  # path in repo -> file
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def save(self, grid_id: int, job_id: int, step: int, state: Any) -> dict[str, Any]:
        """Save locally now, upload with the next batch; return the local pointer."""
        local_pointer = self.store.local.save(grid_id, job_id, step, state)
        self.add_checkpoint(grid_id, job_id, local_pointer)
        return local_pointer

    def add_checkpoint(self, grid_id: int, job_id: int, local_pointer: dict[str, Any],
                       meta: dict[str, Any] | None = None) -> None:
        """Queue a checkpoint the LocalStore wrote (its pointer); it replaces the job's older pending one."""
        step = int(local_pointer["step"])
        path = self.store.path_in_repo(grid_id, job_id, step)
        job_prefix = path.rsplit("/", 1)[0] + "/"
        item = PendingFile(Path(local_pointer["uri"][len("local:"):]), step, local_pointer["time"], meta or {})
        with self._lock:
            for old in [p for p, f in self._pending.items() if p.startswith(job_prefix) and f.step is not None]:
                del self._pending[old]
            self._pending[path] = item
            self._write_journal()

    def add_file(self, path_in_repo: str, local: Path) -> None:
        with self._lock:
            self._pending[path_in_repo] = PendingFile(Path(local), None, time.time())
            self._write_journal()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> list[dict[str, Any]]:
        """Upload everything pending as one commit now; return the new pointers of the checkpoints."""
        with self._flush_lock:
            with self._lock:
                batch = {p: item for p, item in self._pending.items() if item.local.exists()}
                self._pending = dict(batch)
            if not batch:
                return []
            uploaded = {p: item.local for p, item in batch.items()}  # upload() drops the files pruned meanwhile
            sha = self.store.upload(uploaded, f"{len(batch)} file(s) from a gridfleet worker")
            with self._lock:
                for path, item in batch.items():
                    if self._pending.get(path) is item:
                        del self._pending[path]
                self._write_journal()
            pointers = []
            for path, item in batch.items():
                if item.step is None or sha is None or path not in uploaded:
                    continue
                pointer = self.store.pointer(path, sha, item.step, item.saved_at)
                pointers.append(pointer)
                if self.on_uploaded is not None:
                    try:
                        self.on_uploaded(pointer, item.meta)
                    except Exception as exc:  # noqa: BLE001 - one failed record must not stop the others
                        log.warning("recording uploaded checkpoint %s failed: %s", path, exc)
            return pointers

    def start(self) -> "Uploader":
        self._thread = threading.Thread(target=self._run, name="hub-uploader", daemon=True)
        self._thread.start()
        return self

    def stop(self, flush: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if flush:
            self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except HubStoreError as exc:  # our message carries no token
                log.warning("upload to the Hub failed, will retry at the next interval: %s", exc)

    # -- the journal -----------------------------------------------------------------------------------
    def _write_journal(self) -> None:
        """Called with the lock held. Best effort: the local files are the data, this is only the to-do list."""
        if self.journal is None:
            return
        files = {p: {"local": str(f.local), "step": f.step, "saved_at": f.saved_at, "meta": f.meta}
                 for p, f in self._pending.items()}
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        temp = self.journal.with_name(f".{self.journal.name}.tmp")
        # Owner only: a pending checkpoint's meta holds the secret of the worker that will record it.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps({"store": self.store.uri, "files": files}))
        os.replace(temp, self.journal)

    def resume(self, files: dict[str, dict[str, Any]]) -> int:
        """Take over the files of a journal (`read_journal(...)["files"]`) a killed process left; returns
        how many are pending now."""
        with self._lock:
            for path, f in files.items():
                if Path(f["local"]).exists() and path not in self._pending:
                    self._pending[path] = PendingFile(Path(f["local"]), f["step"], f["saved_at"], f.get("meta") or {})
            self._write_journal()
            return len(self._pending)


def read_journal(path: Path) -> dict[str, Any] | None:
    """An Uploader's journal, {"store": its hf:// URI, "files": {...}}; None (logged) when unreadable."""
    try:
        journal = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable upload journal %s: %s", path, exc)
        return None
    if not isinstance(journal, dict) or not {"store", "files"} <= journal.keys():
        log.warning("ignoring upload journal %s: it holds no store and files", path)
        return None
    return journal


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _describe(what: str, repo_id: str, status: int | None, attempts: int, kind: str | None = None) -> str:
    reason = f"HTTP {status}" if status is not None else (kind or "network error")
    hint = {
        401: " (is the Hub token valid?)",
        403: " (does the token have write access to this repo?)",
        404: " (does the repo or revision exist, and can the token read it?)",
    }.get(status or 0, "")
    return f"Hub {what} in {repo_id} failed after {attempts} attempt(s): {reason}{hint}"
