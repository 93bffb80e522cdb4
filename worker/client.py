"""How an agent talks to the queue: over HTTP (`ApiClient`) or, in embedded mode, directly (`DirectClient`).

Both return plain dicts: claim -> job dict or None; fenced writes -> {"ok", "stop", "cancel", "reason"}.
A gang (docs/gang_claims.md): claim_gang -> a list of job dicts; heartbeat_gang and finish_gang take a list of
members (each the body of a single heartbeat or finish) and return one such dict per member, with its job_id.
An ApiClient speaks for the worker it registered last: it sends that registration's worker secret with
every call (api/worker_secrets.py), and keeps it only in memory.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

import httpx

from common.json_checks import BadValue, clean_text, cleaned, cleaned_note

log = logging.getLogger("gridfleet.worker")
WORKER_SECRET_HEADER = "X-Gridfleet-Worker-Secret"  # api/worker_secrets.HEADER (the worker does not import api/)
_CLIENT_DEFAULT: Any = object()  # _post's retry_for: the client's own retry_for


class ServerUnavailable(RuntimeError):
    pass


class Refused(RuntimeError):
    """The server refused a body (a 4xx other than 409), or it cannot be sent at all (e.g. nested too deep,
    NaN inside a list): sending the same body again cannot succeed, so the caller drops it."""


_JSON = {"Content-Type": "application/json"}


class ApiClient:
    """HTTP client for /api/v1/workers. Retries connection errors and 5xx for `retry_for` seconds, so an
    API restart pauses workers instead of failing their jobs. A running job's heartbeat and checkpoint
    pointer are tried once: their callers keep the data and try again, training goes on meanwhile. A
    finish waits for the server for `finish_retry_for` seconds (None: as long as it takes), since the
    agent holds the job's outcome."""

    def __init__(self, server_url: str, token: str, retry_for: float = 300.0, timeout: float = 30.0,
                 finish_retry_for: float | None = None, worker_secret: str | None = None):
        self._base_url = server_url.rstrip("/") + "/api/v1"
        self._http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        if worker_secret:  # a client for a worker registered elsewhere (benches, tests)
            self._http.headers[WORKER_SECRET_HEADER] = worker_secret
        # Parsed once per path: httpx parses and merges a str URL on every request (a fifth of this
        # client's CPU per request in bench/queue_throughput.py).
        self._urls: dict[str, httpx.URL] = {}
        self.retry_for = retry_for
        self.finish_retry_for = finish_retry_for

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any], retry_for: float | None = _CLIENT_DEFAULT,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
        """`retry_for`: seconds to keep retrying (0: one try; None: until the server answers)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base_url + path)
        try:  # ensure_ascii: a lone surrogate travels as an escape, and the server repairs or names it
            content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (ValueError, TypeError, RecursionError) as exc:
            raise Refused(f"cannot send POST {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
        retry_for = self.retry_for if retry_for is _CLIENT_DEFAULT else retry_for
        deadline = None if retry_for is None else time.monotonic() + retry_for
        delay = 0.5
        while True:
            try:
                response = self._http.post(url, content=content, headers={**_JSON, **headers} if headers else _JSON)
            except httpx.TransportError as exc:
                problem = f"cannot reach the server: {type(exc).__name__}"
            else:
                if response.status_code == 409:
                    data = response.json()
                    return {"ok": False, "stop": True, "cancel": False, "reason": data["error"]["message"]}
                if response.status_code < 500:
                    if response.status_code >= 400:
                        message = response.json().get("error", {}).get("message", response.text)
                        raise Refused(f"server refused POST {path}: {response.status_code} {message}")
                    return response.json()
                problem = f"server error {response.status_code}"
            if deadline is not None and time.monotonic() >= deadline:
                raise ServerUnavailable(f"POST {path}: {problem}; gave up after {retry_for:.0f} s")
            log.warning("POST %s: %s; retrying in %.1f s", path, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        """Register a new worker; from now on this client sends its secret (a default header: no per-call
        cost). The reply's worker_secret is the only copy: never log it."""
        reply = self._post("/workers/register", info)
        if reply.get("worker_secret"):  # a server from before worker secrets sends none and needs none
            self._http.headers[WORKER_SECRET_HEADER] = reply["worker_secret"]
        return reply

    def claim(self, worker_id: str, **filters: Any) -> dict[str, Any] | None:
        return self._post(f"/workers/{worker_id}/claim", filters)["job"]

    def claim_gang(self, worker_id: str, max_jobs: int, **filters: Any) -> list[dict[str, Any]]:
        return self._post(f"/workers/{worker_id}/claim", {**filters, "max_jobs": max_jobs})["jobs"]

    def heartbeat_gang(self, worker_id: str, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tried once, as a running job's heartbeat: the caller beats again with fresh data."""
        return self._post(f"/workers/{worker_id}/heartbeat-gang", {"members": members}, retry_for=0.0)["members"]

    def finish_gang(self, worker_id: str, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self._post(f"/workers/{worker_id}/finish-gang", {"members": members},
                          retry_for=self.finish_retry_for)["members"]

    def heartbeat(self, worker_id: str, **body: Any) -> dict[str, Any]:
        running = body.get("job_id") is not None  # the heartbeat thread retries with fresh data next beat
        return self._post(f"/workers/{worker_id}/heartbeat", body, retry_for=0.0 if running else _CLIENT_DEFAULT)

    def set_checkpoint(self, worker_id: str, job_id: int, attempt_id: str, pointer: dict,
                       worker_secret: str | None = None) -> dict[str, Any]:
        """`worker_secret`: for a worker other than this client's (an earlier agent's upload, recorded late).
        Tried once: worker/pointers.py retries, with the newest pointer by then."""
        return self._post(f"/workers/{worker_id}/checkpoint",
                          {"job_id": job_id, "attempt_id": attempt_id, "pointer": pointer}, retry_for=0.0,
                          headers={WORKER_SECRET_HEADER: worker_secret} if worker_secret else None)

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

    def __init__(self, queue, heartbeat_seconds: float, max_gang_jobs: int | None = None, searches=None):
        self.queue = queue
        self.heartbeat_seconds = heartbeat_seconds
        self.max_gang_jobs = max_gang_jobs  # told the agent at registration, as the API tells it
        self.searches = searches  # scheduler.search.Searches: a finished trial makes the next one at once

    def close(self) -> None:
        self.queue.engine.dispose()

    @staticmethod
    def _reply(reply) -> dict[str, Any]:
        return {"ok": reply.ok, "stop": reply.stop, "cancel": reply.cancel, "prune": reply.prune,
                "reason": reply.reason, "state": reply.state}

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        worker_id = self.queue.register_worker(**info)
        return {"worker_id": worker_id, "lease_seconds": self.queue.policy.lease_seconds,
                "heartbeat_seconds": self.heartbeat_seconds, "max_gang_jobs": self.max_gang_jobs}

    def claim(self, worker_id: str, **filters: Any) -> dict[str, Any] | None:
        job = self.queue.claim(worker_id, **filters)
        return None if job is None else asdict(job)

    def heartbeat(self, worker_id: str, job_id=None, attempt_id=None, step=None, progress=None,
                  metrics=(), events=()) -> dict[str, Any]:
        if job_id is None:
            return {"ok": self.queue.worker_seen(worker_id)}
        batch, events = _cleaned_beat(metrics, events)
        reply = self.queue.heartbeat(job_id, attempt_id, step=step, progress=tuple(progress) if progress else None,
                                     metrics=batch, worker_id=worker_id)
        if reply.ok and events:
            self.queue.add_events(job_id, attempt_id, events, worker_id=worker_id)
        return self._reply(reply)

    def claim_gang(self, worker_id: str, max_jobs: int, **filters: Any) -> list[dict[str, Any]]:
        from scheduler.gang import GangError, claim_gang

        try:
            return [asdict(job) for job in claim_gang(self.queue, worker_id, max_jobs, **filters)]
        except GangError as exc:
            raise Refused(f"refused {exc.field}: {exc.message}") from None

    def heartbeat_gang(self, worker_id: str, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from scheduler.gang import GangError, MemberBeat, heartbeat_gang

        beats, notes = [], []
        for m in members:
            batch, events = _cleaned_beat(m.get("metrics", ()), m.get("events", ()))
            progress = m.get("progress")
            beats.append(MemberBeat(m["job_id"], m["attempt_id"], step=m.get("step"),
                                    progress=tuple(progress) if progress else None, metrics=batch))
            notes.append(events)
        try:
            replies = heartbeat_gang(self.queue, worker_id, beats)
        except GangError as exc:
            raise Refused(f"refused {exc.field}: {exc.message}") from None
        for beat, events, reply in zip(beats, notes, replies):
            if reply.ok and events:
                self.queue.add_events(beat.job_id, beat.attempt_id, events, worker_id=worker_id)
        return [{"job_id": beat.job_id, **self._reply(reply)} for beat, reply in zip(beats, replies)]

    def finish_gang(self, worker_id: str, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from scheduler.gang import GangError, MemberFinish, finish_gang

        ends = []
        for i, m in enumerate(members):
            result = m.get("result")
            if result is not None:
                result, repaired = _cleaned(result, f"members.{i}.result")
                if repaired:
                    self.queue.add_events(m["job_id"], m["attempt_id"], [("input_cleaned", cleaned_note(repaired))],
                                          worker_id=worker_id)
            error = m.get("error")
            ends.append(MemberFinish(m["job_id"], m["attempt_id"], m["outcome"], result=result,
                                     error=None if error is None else clean_text(error)[0]))
        try:
            replies = finish_gang(self.queue, worker_id, ends)
        except GangError as exc:
            raise Refused(f"refused {exc.field}: {exc.message}") from None
        if self.searches is not None:
            self.searches.after_finish([end.job_id for end, reply in zip(ends, replies) if reply.ok])
        return [{"job_id": end.job_id, **self._reply(reply)} for end, reply in zip(ends, replies)]

    def set_checkpoint(self, worker_id: str, job_id: int, attempt_id: str, pointer: dict,
                       worker_secret: str | None = None) -> dict[str, Any]:
        return self._reply(self.queue.set_checkpoint(job_id, attempt_id, pointer, worker_id=worker_id))

    def add_events(self, worker_id: str, job_id: int, attempt_id: str, events: list[dict]) -> dict[str, Any]:
        events = [(e["kind"], clean_text(e["message"])[0]) for e in events]
        return self._reply(self.queue.add_events(job_id, attempt_id, events, worker_id=worker_id))

    def finish(self, worker_id: str, job_id: int, attempt_id: str, outcome: str, result=None, error=None) -> dict:
        result, error = self._cleaned_end(worker_id, job_id, attempt_id, result, error)
        reply = self.queue.finish(job_id, attempt_id, outcome, result=result, error=error, worker_id=worker_id)
        if reply.ok and self.searches is not None:
            self.searches.after_finish([job_id])
        return self._reply(reply)

    def finish_and_claim(self, worker_id: str, job_id: int, attempt_id: str, outcome: str, result=None, error=None,
                         claim: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """finish, then claim with the filters in `claim`, in one transaction on SQLite (Queue.finish_and_claim):
        the finish's reply and the next job or None (nothing claimable, or the finish was refused)."""
        result, error = self._cleaned_end(worker_id, job_id, attempt_id, result, error)
        reply, job = self.queue.finish_and_claim(job_id, attempt_id, outcome, result=result, error=error,
                                                 worker_id=worker_id, **(claim or {}))
        if reply.ok and self.searches is not None:  # a trial made now waits for a later claim (this one ran)
            self.searches.after_finish([job_id])
        return self._reply(reply), None if job is None else asdict(job)

    def _cleaned_end(self, worker_id: str, job_id: int, attempt_id: str, result, error):
        """A finish's result and error under the API's rules; what was repaired is said in an event."""
        if result is not None:
            result, repaired = _cleaned(result, "result")
            if repaired:
                self.queue.add_events(job_id, attempt_id, [("input_cleaned", cleaned_note(repaired))],
                                      worker_id=worker_id)
        return result, None if error is None else clean_text(error)[0]

    def record_code_rev(self, worker_id: str, job_id: int, attempt_id: str, sha: str) -> dict[str, Any]:
        return self._reply(self.queue.record_code_rev(job_id, attempt_id, sha, worker_id=worker_id))

    def worker_event(self, worker_id: str, kind: str, message: str,
                     resources: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"ok": self.queue.worker_event(worker_id, kind, message, resources)}


def _cleaned_beat(metrics, events) -> tuple[list, list[tuple[str, str]]]:
    """A heartbeat's metrics and events under the API's rules for what a string may hold
    (common/json_checks.py), here without the API; an event says which metric values were repaired."""
    from scheduler.queue import Metric

    repaired: list[str] = []
    batch = []
    for i, m in enumerate(metrics):
        values, changed = _cleaned(m["values"], f"metrics.{i}.values")
        repaired += changed
        batch.append(Metric(step=m["step"], values=values, time=m["time"]))
    events = [(e["kind"], clean_text(e["message"])[0]) for e in events]
    if repaired:
        events.append(("input_cleaned", cleaned_note(repaired)))
    return batch, events


def _cleaned(value: Any, field: str) -> tuple[Any, list[str]]:
    """json_checks.cleaned, with a refusal as the ApiClient would get it from the server."""
    try:
        return cleaned(value, field)
    except BadValue as exc:
        raise Refused(f"refused {exc.field}: {exc.message}") from None
