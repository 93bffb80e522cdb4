"""How an agent talks to the queue: over HTTP (`ApiClient`) or, in embedded mode, directly (`DirectClient`).

Both return plain dicts: claim -> job dict or None; fenced writes -> {"ok", "stop", "cancel", "reason"}.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import httpx

log = logging.getLogger("gridfleet.worker")
_CLIENT_DEFAULT: Any = object()  # _post's retry_for: the client's own retry_for


class ServerUnavailable(RuntimeError):
    pass


class ApiClient:
    """HTTP client for /api/v1/workers. Retries connection errors and 5xx for `retry_for` seconds, so an
    API restart pauses workers instead of failing their jobs. A running job's heartbeat and checkpoint
    pointer are tried once: their callers keep the data and try again, training goes on meanwhile. A
    finish waits for the server for `finish_retry_for` seconds (None: as long as it takes), since the
    agent holds the job's outcome."""

    def __init__(self, server_url: str, token: str, retry_for: float = 300.0, timeout: float = 30.0,
                 finish_retry_for: float | None = None):
        self._base_url = server_url.rstrip("/") + "/api/v1"
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        # Parsed once per path: httpx parses and merges a str URL on every request (a fifth of this
        # client's CPU per request in bench/queue_throughput.py).
        self._urls: dict[str, httpx.URL] = {}
        self.retry_for = retry_for
        self.finish_retry_for = finish_retry_for

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any], retry_for: float | None = _CLIENT_DEFAULT) -> dict[str, Any]:
        """`retry_for`: seconds to keep retrying (0: one try; None: until the server answers)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base_url + path)
        retry_for = self.retry_for if retry_for is _CLIENT_DEFAULT else retry_for
        deadline = None if retry_for is None else time.monotonic() + retry_for
        delay = 0.5
        while True:
            try:
                response = self._http.post(url, json=body)
            except httpx.TransportError as exc:
                problem = f"cannot reach the server: {type(exc).__name__}"
            else:
                if response.status_code == 409:
                    data = response.json()
                    return {"ok": False, "stop": True, "cancel": False, "reason": data["error"]["message"]}
                if response.status_code < 500:
                    if response.status_code >= 400:
                        message = response.json().get("error", {}).get("message", response.text)
                        raise RuntimeError(f"server refused POST {path}: {response.status_code} {message}")
                    return response.json()
                problem = f"server error {response.status_code}"
            if deadline is not None and time.monotonic() >= deadline:
                raise ServerUnavailable(f"POST {path}: {problem}; gave up after {retry_for:.0f} s")
            log.warning("POST %s: %s; retrying in %.1f s", path, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        return self._post("/workers/register", info)

    def claim(self, worker_id: str, **filters: Any) -> dict[str, Any] | None:
        return self._post(f"/workers/{worker_id}/claim", filters)["job"]

    def heartbeat(self, worker_id: str, **body: Any) -> dict[str, Any]:
        running = body.get("job_id") is not None  # the heartbeat thread retries with fresh data next beat
        return self._post(f"/workers/{worker_id}/heartbeat", body, retry_for=0.0 if running else _CLIENT_DEFAULT)

    def set_checkpoint(self, worker_id: str, job_id: int, attempt_id: str, pointer: dict) -> dict[str, Any]:
        # worker/pointers.py retries, with the newest pointer by then
        return self._post(f"/workers/{worker_id}/checkpoint",
                          {"job_id": job_id, "attempt_id": attempt_id, "pointer": pointer}, retry_for=0.0)

    def add_events(self, worker_id: str, job_id: int, attempt_id: str, events: list[dict]) -> dict[str, Any]:
        return self._post(f"/workers/{worker_id}/events",
                          {"job_id": job_id, "attempt_id": attempt_id, "events": events})

    def finish(self, worker_id: str, **body: Any) -> dict[str, Any]:
        return self._post(f"/workers/{worker_id}/finish", body, retry_for=self.finish_retry_for)

    def record_code_rev(self, worker_id: str, job_id: int, attempt_id: str, sha: str) -> dict[str, Any]:
        return self._post(f"/workers/{worker_id}/code_rev",
                          {"job_id": job_id, "attempt_id": attempt_id, "code_rev": sha})

    def worker_event(self, worker_id: str, kind: str, message: str,
                     resources: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._post(f"/workers/{worker_id}/worker_events",
                          {"kind": kind, "message": message, "resources": resources})


class DirectClient:
    """The same calls against a Queue in this process (embedded mode: SQLite, no server)."""

    def __init__(self, queue, heartbeat_seconds: float):
        self.queue = queue
        self.heartbeat_seconds = heartbeat_seconds

    def close(self) -> None:
        self.queue.engine.dispose()

    @staticmethod
    def _reply(reply) -> dict[str, Any]:
        return {"ok": reply.ok, "stop": reply.stop, "cancel": reply.cancel, "reason": reply.reason,
                "state": reply.state}

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        worker_id = self.queue.register_worker(**info)
        return {"worker_id": worker_id, "lease_seconds": self.queue.policy.lease_seconds,
                "heartbeat_seconds": self.heartbeat_seconds}

    def claim(self, worker_id: str, **filters: Any) -> dict[str, Any] | None:
        job = self.queue.claim(worker_id, **filters)
        return None if job is None else asdict(job)

    def heartbeat(self, worker_id: str, job_id=None, attempt_id=None, step=None, progress=None,
                  metrics=(), events=()) -> dict[str, Any]:
        from scheduler.queue import Metric

        if job_id is None:
            return {"ok": self.queue.worker_seen(worker_id)}
        if events:
            self.queue.add_events(job_id, attempt_id, [(e["kind"], e["message"]) for e in events])
        reply = self.queue.heartbeat(
            job_id, attempt_id, step=step, progress=tuple(progress) if progress else None,
            metrics=[Metric(step=m["step"], values=m["values"], time=m["time"]) for m in metrics],
        )
        return self._reply(reply)

    def set_checkpoint(self, worker_id: str, job_id: int, attempt_id: str, pointer: dict) -> dict[str, Any]:
        return self._reply(self.queue.set_checkpoint(job_id, attempt_id, pointer))

    def add_events(self, worker_id: str, job_id: int, attempt_id: str, events: list[dict]) -> dict[str, Any]:
        return self._reply(self.queue.add_events(job_id, attempt_id, [(e["kind"], e["message"]) for e in events]))

    def finish(self, worker_id: str, job_id: int, attempt_id: str, outcome: str, result=None, error=None) -> dict:
        return self._reply(self.queue.finish(job_id, attempt_id, outcome, result=result, error=error))

    def record_code_rev(self, worker_id: str, job_id: int, attempt_id: str, sha: str) -> dict[str, Any]:
        return self._reply(self.queue.record_code_rev(job_id, attempt_id, sha))

    def worker_event(self, worker_id: str, kind: str, message: str,
                     resources: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"ok": self.queue.worker_event(worker_id, kind, message, resources)}
