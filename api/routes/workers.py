"""The worker protocol (the hot path): register, claim, heartbeat, checkpoint, events, finish.

A gang (docs/gang_claims.md) is claimed with `max_jobs` > 1 and heartbeated and finished with one batched
call each (`heartbeat-gang`, `finish-gang`): those answer 200 with one reply per member, and a member the
queue refuses gets `"ok": false, "stop": true` there while the others are written.

Every call under /workers/{worker_id}/ carries the worker secret register returned (api/worker_secrets.py:
403 without it), and every write after a claim carries the attempt id; a write the queue refuses (the attempt
is no longer current, or another worker holds the job) is a 409 `stale_attempt` with `"stop": true`, and the
worker must drop the job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine

from api import auth, worker_secrets
from api.deps import get_engine, get_queue, get_searches
from api.errors import ApiError, error_response
from api.models import Checkpoint, Claim, CodeRev, Events, Finish, GangFinish, GangHeartbeat, Heartbeat, \
    RegisterWorker, WorkerEvent
from api.responses import JSONResponse
from api.routes.common import router as make_router
from api.worker_secrets import WorkerId
from common.json_checks import cleaned_note
from scheduler import gang, reports
from scheduler.queue import Metric, Queue, Reply
from scheduler.search import Searches

router = make_router("workers")
# The path's worker id, once the caller proved to be that worker: token first (401/403 by role), then the
# worker's own secret (404 unknown worker, 403 wrong secret). One dependency does both (CPU per request).
ProvenWorkerId = Annotated[str, Depends(worker_secrets.check)]


def _stale(reply: Reply) -> JSONResponse:
    return error_response(409, "stale_attempt", reply.reason or "this attempt is no longer current; stop",
                          extra={"stop": True})


@router.post("/workers/register", status_code=201, dependencies=[Depends(auth.worker)],
             summary="A new worker id and its worker_secret (returned only here: send it as "
                     f"{worker_secrets.HEADER} with every call under /workers/{{worker_id}}/)")
def register(body: RegisterWorker, request: Request, queue: Queue = Depends(get_queue)):
    secret, secret_hash = worker_secrets.new_secret()
    worker_id = queue.register_worker(name=body.name, host=body.host, trainers=body.trainers, gpus=body.gpus,
                                      resources=body.resources, code_rev=body.code_rev, secret_hash=secret_hash)
    request.app.state.worker_secrets[worker_id] = secret_hash
    settings = request.app.state.settings
    return JSONResponse({"worker_id": worker_id, "worker_secret": secret, "lease_seconds": queue.policy.lease_seconds,
                         "heartbeat_seconds": settings.heartbeat_seconds, "max_gang_jobs": settings.max_gang_jobs},
                        status_code=201)


def _gang_size(request: Request, n: int, field: str) -> None:
    limit = request.app.state.settings.max_gang_jobs
    if n > limit:
        raise ApiError(422, "invalid_request", f"{field}: at most {limit} jobs in one gang on this server; got {n}",
                       [{"field": field, "message": f"at most {limit} (the server's max_gang_jobs)"}])


def _gang_error(exc: gang.GangError) -> ApiError:
    return ApiError(422, "invalid_request", str(exc), [{"field": exc.field, "message": exc.message}])


def _member(job_id: int, reply: Reply) -> dict:
    return {"job_id": job_id, "ok": reply.ok, "stop": reply.stop, "cancel": reply.cancel, "prune": reply.prune,
            "reason": reply.reason, "state": reply.state, "lease_expires_at": reply.lease_expires_at}


@router.post("/workers/{worker_id}/claim",
             summary="Take the best runnable job, or {\"job\": null}; with max_jobs > 1 a gang: also "
                     "\"jobs\", up to max_jobs jobs of one grid sharing a fuse key")
def claim(worker_id: ProvenWorkerId, body: Claim, request: Request, queue: Queue = Depends(get_queue)):
    only_grid = {"grid_id": body.grid_id} if body.grid_id is not None else {}
    filters = dict(trainers=body.trainers, gpus=body.gpus, can_pin_code=body.can_pin_code, code_rev=body.code_rev,
                   **only_grid)
    if body.max_jobs == 1:  # the single claim, as before gangs
        job = queue.claim(worker_id, **filters)
        return JSONResponse({"job": dataclasses.asdict(job) if job else None})
    _gang_size(request, body.max_jobs, "max_jobs")
    jobs = [dataclasses.asdict(job) for job in gang.claim_gang(queue, worker_id, body.max_jobs, **filters)]
    request.app.state.metrics.note_claims(len(jobs))
    return JSONResponse({"job": jobs[0] if jobs else None, "jobs": jobs})


@router.post("/workers/{worker_id}/heartbeat-gang",
             summary="Heartbeat every member of a gang in one call; one reply per member")
def heartbeat_gang(worker_id: ProvenWorkerId, body: GangHeartbeat, request: Request,
                   queue: Queue = Depends(get_queue)):
    _gang_size(request, len(body.members), "members")
    now = time.time()
    members = [gang.MemberBeat(m.job_id, m.attempt_id, step=m.step, progress=m.progress,
                               metrics=[Metric(step=x.step, values=x.values, time=now if x.time is None else x.time)
                                        for x in m.metrics])
               for m in body.members]
    try:
        replies = gang.heartbeat_gang(queue, worker_id, members, now=now)
    except gang.GangError as exc:
        raise _gang_error(exc) from None
    for reply in replies:
        request.app.state.metrics.note_heartbeat(reply)
    out = []
    for m, reply in zip(body.members, replies):
        events = [(e.kind, e.message) for e in m.events]
        if m._cleaned:
            events.append(("input_cleaned", cleaned_note(m._cleaned)))
        if reply.ok and events:  # rare: a statement per member that has any
            noted = queue.add_events(m.job_id, m.attempt_id, events, worker_id=worker_id)
            reply = reply if noted.ok else noted
        out.append(_member(m.job_id, reply))
    return JSONResponse({"members": out})


@router.post("/workers/{worker_id}/finish-gang",
             summary="End the attempts of a gang's members in one call, each with its own outcome; one reply "
                     "per member")
def finish_gang(worker_id: ProvenWorkerId, body: GangFinish, request: Request, queue: Queue = Depends(get_queue),
                searches: Searches = Depends(get_searches)):
    _gang_size(request, len(body.members), "members")
    members = [gang.MemberFinish(m.job_id, m.attempt_id, m.outcome, result=m.result, error=m.error)
               for m in body.members]
    refused: dict[int, Reply] = {}
    if any(m._cleaned for m in body.members):  # rare; the batch must be whole before any note is written
        try:
            gang.check_members(queue, members)
        except gang.GangError as exc:
            raise _gang_error(exc) from None
    for m in body.members:
        if m._cleaned:  # said on the job before its attempt ends, as the single finish does
            noted = queue.add_events(m.job_id, m.attempt_id, [("input_cleaned", cleaned_note(m._cleaned))],
                                     worker_id=worker_id)
            if not noted.ok:
                refused[m.job_id] = noted
    members = [m for m in members if m.job_id not in refused]
    try:
        replies = dict(zip([m.job_id for m in members], gang.finish_gang(queue, worker_id, members))) if members else {}
    except gang.GangError as exc:
        raise _gang_error(exc) from None
    for m in members:
        request.app.state.metrics.note_finish(m.outcome, replies[m.job_id])
    searches.after_finish([m.job_id for m in members if replies[m.job_id].ok])  # next trials of a search
    return JSONResponse({"members": [_member(m.job_id, refused.get(m.job_id) or replies[m.job_id])
                                     for m in body.members]})


@router.post("/workers/{worker_id}/heartbeat",
             summary="Extend the lease and report progress; without job_id just says the worker is alive")
def heartbeat(worker_id: ProvenWorkerId, body: Heartbeat, queue: Queue = Depends(get_queue)):
    if body.job_id is None:
        if not queue.worker_seen(worker_id):
            raise worker_secrets.unknown_worker(worker_id)
        return JSONResponse({"ok": True})
    if body.attempt_id is None:
        raise ApiError(422, "invalid_request", "attempt_id is required when job_id is given",
                       [{"field": "attempt_id", "message": "required when job_id is given"}])
    now = time.time()
    metrics = [Metric(step=m.step, values=m.values, time=now if m.time is None else m.time) for m in body.metrics]
    reply = queue.heartbeat(body.job_id, body.attempt_id, step=body.step, progress=body.progress,
                            metrics=metrics, now=now, worker_id=worker_id)
    if not reply.ok:
        return _stale(reply)
    events = [(e.kind, e.message) for e in body.events]
    if body._cleaned:  # the job's events say which metrics were repaired (never on the usual path)
        events.append(("input_cleaned", cleaned_note(body._cleaned)))
    if events:
        events_reply = queue.add_events(body.job_id, body.attempt_id, events, worker_id=worker_id)
        if not events_reply.ok:
            return _stale(events_reply)
    answer = {"ok": True, "cancel": reply.cancel, "stop": False, "lease_expires_at": reply.lease_expires_at}
    if reply.prune:  # early stopping (docs/early_stopping.md): stop as for a cancel, finish as `pruned`
        answer.update(prune=True, reason=reply.reason)
    if body._cleaned:
        answer["cleaned"] = {"fields": body._cleaned[:100], "message": cleaned_note(body._cleaned)}
    return JSONResponse(answer)


@router.post("/workers/{worker_id}/checkpoint",
             summary="Record the last durable checkpoint pointer")
def checkpoint(worker_id: ProvenWorkerId, body: Checkpoint, queue: Queue = Depends(get_queue)):
    reply = queue.set_checkpoint(body.job_id, body.attempt_id, body.pointer, worker_id=worker_id)
    return JSONResponse({"ok": True}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/events")
def events(worker_id: ProvenWorkerId, body: Events, queue: Queue = Depends(get_queue)):
    reply = queue.add_events(body.job_id, body.attempt_id, [(e.kind, e.message) for e in body.events],
                             worker_id=worker_id)
    return JSONResponse({"ok": True}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/finish",
             summary="End the attempt: succeeded, error (retried with backoff), preempted, cancelled or pruned")
def finish(worker_id: ProvenWorkerId, body: Finish, queue: Queue = Depends(get_queue),
           searches: Searches = Depends(get_searches)):
    if body._cleaned:  # said on the job before the attempt ends (the fence refuses a stale attempt here too)
        noted = queue.add_events(body.job_id, body.attempt_id, [("input_cleaned", cleaned_note(body._cleaned))],
                                 worker_id=worker_id)
        if not noted.ok:
            return _stale(noted)
    reply = queue.finish(body.job_id, body.attempt_id, body.outcome, result=body.result, error=body.error,
                         worker_id=worker_id)
    if reply.ok:
        searches.after_finish([body.job_id])  # a search's next trial is queued before the worker claims again
    return JSONResponse({"ok": True, "state": reply.state}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/code_rev",
             summary="Record the full commit sha the attempt runs (pinned code_rev, resolved by the worker)")
def code_rev(worker_id: ProvenWorkerId, body: CodeRev, queue: Queue = Depends(get_queue)):
    reply = queue.record_code_rev(body.job_id, body.attempt_id, body.code_rev, worker_id=worker_id)
    return JSONResponse({"ok": True}) if reply.ok else _stale(reply)


@router.post("/workers/{worker_id}/worker_events",
             summary="Record what happened to the worker outside any job (self-update, rollback, ...)")
def worker_event(worker_id: ProvenWorkerId, body: WorkerEvent, queue: Queue = Depends(get_queue)):
    if not queue.worker_event(worker_id, body.kind, body.message, body.resources):
        raise worker_secrets.unknown_worker(worker_id)
    return JSONResponse({"ok": True})


@router.get("/workers/{worker_id}/events", dependencies=[Depends(auth.any_role)],
            summary="What happened to the worker outside its jobs, oldest first")
def worker_events(worker_id: WorkerId, engine: Engine = Depends(get_engine)):
    return JSONResponse({"worker_id": worker_id, "events": reports.worker_events(engine, worker_id)})


@router.get("/workers", dependencies=[Depends(auth.any_role)])
def list_workers(engine: Engine = Depends(get_engine)):
    return JSONResponse({"workers": reports.list_workers(engine)})
