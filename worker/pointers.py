"""Checkpoint pointers go on their jobs from a thread of their own, so training never waits on the server.

`PointerRecorder.record` only notes the pointer: per attempt only the newest pending one is kept (an older
one that was never recorded is superseded by it). The thread sends it, and while the server cannot be
reached it keeps retrying with backoff; a pointer that could not be recorded during an API outage is
recorded on reconnect. `wait` blocks until an attempt has nothing pending (before its finish, so the next
attempt finds the newest checkpoint); `drop` forgets a stale attempt's pointers (it must write nothing).
A refused pointer (the attempt is not current) is handed to `on_stale`; `on_sending` and `on_recorded` let
the checkpoint sync keep the files those pointers name.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from worker.client import ServerUnavailable

log = logging.getLogger("gridfleet.worker")
RETRY_MAX_SECONDS = 10.0
LOG_EVERY_SECONDS = 30.0  # while the server is away, say so at most this often

Key = tuple[int, str]  # (job id, attempt id)


class PointerRecorder:
    def __init__(self, client, on_stale: Callable[[int, str, str], None] | None = None,
                 retry_max: float = RETRY_MAX_SECONDS):
        self.client = client
        self.worker_id: str | None = None  # set by the agent once registered
        self.on_stale = on_stale
        # (job id, pointer) before a send; False: skip it (its file is gone, a newer pointer is coming)
        self.on_sending: Callable[[int, dict[str, Any]], bool] | None = None
        self.on_recorded: Callable[[int, dict[str, Any]], None] | None = None  # once the job took it
        self.retry_max = retry_max
        self._pending: dict[Key, dict[str, Any]] = {}
        self._owners: dict[Key, tuple[str, str | None]] = {}  # an earlier agent's attempt: (worker id, secret)
        self._changed = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def record(self, job_id: int, attempt_id: str, pointer: dict[str, Any], worker_id: str | None = None,
               worker_secret: str | None = None) -> None:
        """`worker_id`/`worker_secret`: the registration that ran the attempt, when not this agent's (an upload
        an earlier agent on this machine left pending)."""
        with self._changed:
            if worker_id is not None and worker_id != self.worker_id:
                self._owners[(job_id, attempt_id)] = (worker_id, worker_secret)
            self._pending.pop((job_id, attempt_id), None)
            self._pending[(job_id, attempt_id)] = pointer  # newest last: the dict's order is the send order
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-pointers", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def pending(self, job_id: int, attempt_id: str) -> dict[str, Any] | None:
        with self._changed:
            return self._pending.get((job_id, attempt_id))

    def wait(self, job_id: int, attempt_id: str, timeout: float | None = None) -> bool:
        """Until the attempt's newest pointer is recorded (or refused). False when `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: (job_id, attempt_id) not in self._pending, timeout)

    def drop(self, job_id: int, attempt_id: str) -> None:
        with self._changed:
            self._owners.pop((job_id, attempt_id), None)
            if self._pending.pop((job_id, attempt_id), None) is not None:
                log.info("job %s: attempt %s is stale; its pending checkpoint pointer is dropped", job_id, attempt_id)
            self._changed.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Record what is pending (up to `timeout` seconds), then stop the thread."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._pending, timeout):
                log.warning("%d checkpoint pointer(s) could not be recorded before the agent stopped",
                            len(self._pending))
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        delay, away_since, logged_at = 0.5, None, 0.0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if self._closing:
                    return
                (job_id, attempt_id), pointer = next(iter(self._pending.items()))
                worker_id, worker_secret = self._owners.get((job_id, attempt_id), (self.worker_id, None))
            if self.on_sending is not None and not self.on_sending(job_id, pointer):
                self._done(job_id, attempt_id, pointer)
                continue
            try:
                reply = self.client.set_checkpoint(worker_id, job_id, attempt_id, pointer, worker_secret=worker_secret)
            except ServerUnavailable as exc:  # keep it (or a newer one) and try again
                now = time.monotonic()
                if away_since is None:
                    away_since = now
                if now - logged_at >= LOG_EVERY_SECONDS:
                    logged_at = now
                    log.warning("job %s: checkpoint pointer (step %s) not recorded yet, will retry: %s",
                                job_id, pointer.get("step"), exc)
                with self._changed:
                    self._changed.wait_for(lambda: self._closing, delay)
                delay = min(delay * 2, self.retry_max)
                continue
            except Exception as exc:  # noqa: BLE001 - the server refused this pointer: retrying cannot help
                log.error("job %s: checkpoint pointer (step %s) refused: %s", job_id, pointer.get("step"), exc)
                reply = None
            if away_since is not None:
                log.info("checkpoint pointers are recorded again after %.0f s", time.monotonic() - away_since)
            delay, away_since, logged_at = 0.5, None, 0.0
            if reply is not None and reply["ok"] and self.on_recorded is not None:
                self.on_recorded(job_id, pointer)
            self._done(job_id, attempt_id, pointer)
            if reply is not None and not reply["ok"] and self.on_stale is not None:
                self.on_stale(job_id, attempt_id, reply.get("reason") or "checkpoint refused")

    def _done(self, job_id: int, attempt_id: str, pointer: dict[str, Any]) -> None:
        with self._changed:
            if self._pending.get((job_id, attempt_id)) is pointer:  # unless a newer one came meanwhile
                del self._pending[(job_id, attempt_id)]
                self._owners.pop((job_id, attempt_id), None)
            self._changed.notify_all()
