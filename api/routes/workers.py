"""The worker protocol (the hot path): register, claim, heartbeat, checkpoint, events, finish.

Every write after a claim carries the attempt id; a write the queue refuses (the attempt is no longer
current) is a 409 `stale_attempt` with `"stop": true`, and the worker must drop the job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy import Engine, select

from api import auth
from api.deps import get_engine, get_queue
from api.errors import ApiError, error_response
from api.models import Checkpoint, Claim, CodeRev, Events, Finish, Heartbeat, RegisterWorker, WorkerEvent
from api.responses import JSONResponse
from api.routes.common import router as make_router
from common import schema as t
from common.db import read_tx
from common.json_checks import cleaned_note
from scheduler import reports
from scheduler.queue import Metric, Queue, Reply

router = make_router("workers")
WorkerId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="from POST /workers/register")]


def _stale(reply: Reply) -> JSONResponse:
    return error_response(409, "stale_attempt", reply.reason or "this attempt is no longer current; stop",
                          extra={"stop": True})


def _unknown_worker(worker_id: str) -> ApiError:
    return ApiError(404, "unknown_worker", f"no worker {worker_id}; register again with POST /api/v1/workers/register")


def _check_worker(request: Request, engine: Engine, worker_id: str) -> None:
    known: set[str] = request.app.state.known_workers
    if worker_id in known:
        return
    with read_tx(engine) as conn:
        if conn.execute(select(t.workers.c.id).where(t.workers.c.id == worker_id)).first() is None:
            raise _unknown_worker(worker_id)
    known.add(worker_id)


@router.post("/workers/register", status_code=201, dependencies=[Depends(auth.worker)])
def register(body: RegisterWorker, request: Request, queue: Queue = Depends(get_queue)):
    worker_id = queue.register_worker(name=body.name, host=body.host, trainers=body.trainers, gpus=body.gpus,
                                      resources=body.resources, code_rev=body.code_rev)
    request.app.state.known_workers.add(worker_id)
    settings = request.app.state.settings
    return JSONResponse({"worker_id": worker_id, "lease_seconds": queue.policy.lease_seconds,
                         "heartbeat_seconds": settings.heartbeat_seconds}, status_code=201)


@router.post("/workers/{worker_id}/claim", dependencies=[Depends(auth.worker)],
             summary="Take the best runnable job, or {\"job\": null}")
def claim(worker_id: WorkerId, body: Claim, request: Request, queue: Queue = Depends(get_queue)):
    _check_worker(request, queue.engine, worker_id)
    only_grid = {"grid_id": body.grid_id} if body.grid_id is not None else {}
    job = queue.claim(worker_id, trainers=body.trainers, gpus=body.gpus, can_pin_code=body.can_pin_code,
                      code_rev=body.code_rev, **only_grid)
    return JSONResponse({"job": dataclasses.asdict(job) if job else None})


@router.post("/workers/{worker_id}/heartbeat", dependencies=[Depends(auth.worker)],
             summary="Extend the lease and report progress; without job_id just says the worker is alive")
def heartbeat(worker_id: WorkerId, body: Heartbeat, queue: Queue = Depends(get_queue)):
    if body.job_id is None:
        if not queue.worker_seen(worker_id):
            raise _unknown_worker(worker_id)
        return JSONResponse({"ok": True})
    if body.attempt_id is None:
        raise ApiError(422, "invalid_request", "attempt_id is required when job_id is given",
                       [{"field": "attempt_id", "message": "required when job_id is given"}])
    now = time.time()
    metrics = [Metric(step=m.step, values=m.values, time=now if m.time is None else m.time) for m in body.metrics]
    reply = queue.heartbeat(body.job_id, body.attempt_id, step=body.step, progress=body.progress,
                            metrics=metrics, now=now)
    if not reply.ok:
        return _stale(reply)
    events = [(e.kind, e.message) for e in body.events]
    if body._cleaned:  # the job's events say which metrics were repaired (never on the usual path)
        events.append(("input_cleaned", cleaned_note(body._cleaned)))
    if events:
        events_reply = queue.add_events(body.job_id, body.attempt_id, events)
        if not events_reply.ok:
            return _stale(events_reply)
    answer = {"ok": True, "cancel": reply.cancel, "stop": False, "lease_expires_at": reply.lease_expires_at}
    if body._cleaned:
        answer["cleaned"] = {"fields": body._cleaned[:100], "message": cleaned_note(body._cleaned)}
    return JSONResponse(answer)


@router.post("/workers/{worker_id}/checkpoint", dependencies=[Depends(auth.worker)],
             summary="Record the last durable checkpoint pointer")
def checkpoint(worker_id: WorkerId, body: Checkpoint, queue: Queue = Depends(get_queue)):
    reply = queue.set_checkpoint(body.job_id, body.attempt_id, body.pointer)
    return JSONResponse({"ok": True}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/events", dependencies=[Depends(auth.worker)])
def events(worker_id: WorkerId, body: Events, queue: Queue = Depends(get_queue)):
    reply = queue.add_events(body.job_id, body.attempt_id, [(e.kind, e.message) for e in body.events])
    return JSONResponse({"ok": True}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/finish", dependencies=[Depends(auth.worker)],
             summary="End the attempt: succeeded, error (retried with backoff), preempted or cancelled")
def finish(worker_id: WorkerId, body: Finish, queue: Queue = Depends(get_queue)):
    if body._cleaned:  # said on the job before the attempt ends (the fence refuses a stale attempt here too)
        noted = queue.add_events(body.job_id, body.attempt_id, [("input_cleaned", cleaned_note(body._cleaned))])
        if not noted.ok:
            return _stale(noted)
    reply = queue.finish(body.job_id, body.attempt_id, body.outcome, result=body.result, error=body.error)
    return JSONResponse({"ok": True, "state": reply.state}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/code_rev", dependencies=[Depends(auth.worker)],
             summary="Record the full commit sha the attempt runs (pinned code_rev, resolved by the worker)")
def code_rev(worker_id: WorkerId, body: CodeRev, queue: Queue = Depends(get_queue)):
    reply = queue.record_code_rev(body.job_id, body.attempt_id, body.code_rev)
    return JSONResponse({"ok": True}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/worker_events", dependencies=[Depends(auth.worker)],
             summary="Record what happened to the worker outside any job (self-update, rollback, ...)")
def worker_event(worker_id: WorkerId, body: WorkerEvent, queue: Queue = Depends(get_queue)):
    if not queue.worker_event(worker_id, body.kind, body.message, body.resources):
        raise _unknown_worker(worker_id)
    return JSONResponse({"ok": True})


@router.get("/workers/{worker_id}/events", dependencies=[Depends(auth.any_role)],
            summary="What happened to the worker outside its jobs, oldest first")
def worker_events(worker_id: WorkerId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"worker_id": worker_id, "events": reports.worker_events(engine, worker_id)})


@router.get("/workers", dependencies=[Depends(auth.any_role)])
def list_workers(engine: Engine = Depends(get_engine)):
    return JSONResponse({"workers": reports.list_workers(engine)})
