"""GET /metrics in Prometheus' text format; read `Metrics` first, then `CountedQueue` and `RequestTimer`.

- `gridfleet_jobs{state}`: read from the database at scrape time (one GROUP BY on an index), so it is right
  whatever process changed the jobs.
- counters (claims, heartbeats, lease expiries, finishes, retries by failure kind) count what happened in
  this API process since it started: the API is one process (`gridfleet serve`), so no multiprocess mode.
  Prometheus' rate() copes with the reset when it restarts.
- `gridfleet_request_seconds{method,route,status}`: every request, labelled by the route's template
  (`/api/v1/workers/{worker_id}/claim`), never the raw path, so worker ids do not multiply the series.

Auth: any valid token (Prometheus sends it with `authorization: {credentials: ...}`), or open with
GRIDFLEET_METRICS_PUBLIC=true for a scraper inside a trusted network. Numbers only: no config or secret.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Engine, func, select

from common import schema as t
from common.db import read_tx
from scheduler.policy import JOB_STATES
from scheduler.queue import Queue

# Claims and heartbeats take milliseconds; a page of results or an import can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class JobsByState:
    """A collector: the jobs table's counts per state, asked for at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        with read_tx(self.engine) as conn:
            counts = dict(conn.execute(select(t.jobs.c.state, func.count()).group_by(t.jobs.c.state)).all())
        family = GaugeMetricFamily("gridfleet_jobs", "Jobs in each state, read from the database", labels=["state"])
        for state in JOB_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


class Metrics:
    """One registry per app (tests make many apps in one process; the global registry would refuse them)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(JobsByState(engine))
        r = self.registry
        self.claims = Counter("gridfleet_claims", "Claim calls, by whether they got a job", ["result"], registry=r)
        self.heartbeats = Counter("gridfleet_heartbeats", "Heartbeats with a job, by whether the fence took them",
                                  ["result"], registry=r)
        self.lease_expiries = Counter("gridfleet_lease_expiries",
                                      "Running jobs whose lease expired (requeued as lost, or failed past max_lost)",
                                      registry=r)
        self.finishes = Counter("gridfleet_finishes", "Attempts ended by their worker, by outcome", ["outcome"],
                                registry=r)
        self.retries = Counter("gridfleet_retries",
                               "Jobs queued again after an attempt ended, by failure kind (lost: see lease expiries)",
                               ["kind"], registry=r)
        self.requests = Histogram("gridfleet_request_seconds", "HTTP request latency", ["method", "route", "status"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        for result in ("job", "none"):
            self.claims.labels(result)  # series exist at 0 before the first claim, so rate() works from the start
        for result in ("ok", "stale"):
            self.heartbeats.labels(result)

    def note_claims(self, jobs: int) -> None:
        """A claim call that took `jobs` jobs (a gang counts each member, as that many single claims would)."""
        if jobs:
            self.claims.labels("job").inc(jobs)
        else:
            self.claims.labels("none").inc()

    def note_heartbeat(self, reply) -> None:
        self.heartbeats.labels("ok" if reply.ok else "stale").inc()

    def note_finish(self, outcome: str, reply) -> None:
        if reply.ok:
            self.finishes.labels(outcome).inc()
            if reply.state == "queued":
                self.retries.labels(outcome).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountedQueue(Queue):
    """The API's Queue, counting claims, heartbeats, expiries and finishes as they happen (the queue itself
    knows nothing of Prometheus)."""

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def claim(self, *args: Any, **kwargs: Any):
        job = super().claim(*args, **kwargs)
        self.metrics.note_claims(0 if job is None else 1)
        return job

    def heartbeat(self, *args: Any, **kwargs: Any):
        reply = super().heartbeat(*args, **kwargs)
        self.metrics.note_heartbeat(reply)
        return reply

    def finish(self, job_id: int, attempt_id: str, outcome: str, *args: Any, **kwargs: Any):
        reply = super().finish(job_id, attempt_id, outcome, *args, **kwargs)
        self.metrics.note_finish(outcome, reply)
        return reply

    def _requeue_expired(self, conn, now: float) -> int:  # every expiry path (claim scan, reaper) comes here
        handled = super()._requeue_expired(conn, now)
        if handled:
            self.metrics.lease_expiries.inc(handled)
        return handled


class RequestTimer:
    """ASGI middleware (no BaseHTTPMiddleware: it would add a task per request on the hot worker path)."""

    def __init__(self, app, metrics: Metrics, api_prefix: str):
        self.app = app
        self.metrics = metrics
        self.api_prefix = api_prefix  # FastAPI reports an included router's route without its prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if scope["path"].startswith(self.api_prefix + "/") and not template.startswith(self.api_prefix):
                template = self.api_prefix + template
            self.metrics.requests.labels(scope["method"], template, str(status["code"])).observe(
                time.perf_counter() - began)


def install(app, engine: Engine, public: bool, api_prefix: str) -> Metrics:
    """Adds the middleware and GET /metrics (any token unless `public`); returns the Metrics to count into."""
    from fastapi import Depends
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.responses import Response

    from api import auth
    from api.errors import database_unavailable

    metrics = Metrics(engine)
    app.add_middleware(RequestTimer, metrics=metrics, api_prefix=api_prefix)

    @app.get("/metrics", tags=["health"], dependencies=[] if public else [Depends(auth.any_role)],
             response_class=Response, responses={200: {"content": {"text/plain": {}}}},  # the Prometheus text format
             summary="Prometheus metrics: jobs by state, claims, heartbeats, lease expiries, retries, request latency")
    def prometheus_metrics():
        try:
            body, content_type = metrics.exposition()
        except SQLAlchemyError as exc:
            reason = type(getattr(exc, "orig", None) or exc).__name__
            return database_unavailable(f"the database does not answer ({reason}); jobs by state cannot be read")
        return Response(body, media_type=content_type)

    return metrics
