"""The agent's side of a gang: K claimed jobs trained in one child (worker/gang_child.py), each finished alone.

Read `GangRunner.run` top to bottom: start the child (forked warm, or spawned cold), then loop reading the
child's member-tagged messages and steering members, then finish whoever is left. Every member is a
`JobRun` of its own (metrics, events, step, stop reason, staleness), so the rules of a solo job hold per
member: one heartbeat thread sends `heartbeat_gang` for all members still running (each fenced on its own);
a member that leaves early (its result, NaN or error, a cancel, a refused attempt) is finished right away
while the others train on; SIGTERM asks every member to checkpoint and releases them as preempted.
Network calls for the gang go one at a time (`send_lock`), so a member's last metrics always reach the
server before its finish.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker import gang_size, logs, runner
from worker.client import Refused, ServerUnavailable
from worker.code_cache import CodeUnavailable
from worker.job_run import JobRun, output_tail

log = logging.getLogger("gridfleet.worker")
DRAIN = 512  # messages read from the child per turn of the loop before members are steered again
OUTAGE_LOG_SECONDS = 30.0


def stop_asked(reply: dict[str, Any]) -> str | None:
    """What a member's heartbeat reply asks of it: a stop reason, or None (one place for new reply flags)."""
    if reply.get("cancel"):
        return "cancelled"
    if reply.get("prune"):  # the grid's early-stopping rule: the member leaves as for a cancel, ends pruned
        return "pruned"
    return None


def solo_reason(trainer: str, code_root: Path | None) -> str | None:
    """Why this gang cannot train as one (its first job then runs alone, as today), or None."""
    from worker import trainers

    if trainer not in trainers.FUSED:  # a fuse key but no train_many: jobs run one at a time
        return f"trainer '{trainer}' does not train gangs"
    if code_root is not None and not (code_root / "worker" / "gang_child.py").is_file():
        return "its pinned commit is from before gangs"
    return None


@dataclass
class Member(JobRun):
    """A solo job's run, plus where it stands in the gang."""

    left: tuple[str, Any] | None = None  # the child's last word for it: (kind, payload)
    ended: bool = False  # finished, or given up as not ours: nothing more is sent for it
    told: str | None = None  # "stop" | "drop": what the child was told
    give_up_at: float | None = None  # asked to stop: finished without the child's word after this


@dataclass
class GangRun:
    """What the agent knows about the running gang: one Member per job."""

    members: list[Member]
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # the members' own: beat now
    unreachable_since: float | None = None
    outage_logged_at: float = 0.0

    def request_stop(self, reason: str) -> None:
        for member in self.members:
            member.request_stop(reason)

    def find(self, job_id: int, attempt_id: str):
        for member in self.members:
            if (member.job["id"], member.job["attempt_id"]) == (job_id, attempt_id):
                return member
        return None


class GangRunner:
    def __init__(self, agent, jobs: list[dict[str, Any]]):
        self.agent = agent
        self.options = agent.options
        wake = threading.Event()  # one for the gang: a member's verdict request wakes its heartbeat thread
        self.gang = GangRun([Member(job=job, wake=wake) for job in jobs], wake=wake)
        self.stop = None  # the child's GangStop, once started: the heartbeat thread writes verdicts on it
        self.gang_dir = self.options.home / "work" / f"gang-{jobs[0]['id']}"
        # Members that leave early are finished here, one batch at a time, so the loop keeps reading the
        # child (and the others keep training) while a finish waits for the server.
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gang-finish")

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        agent, members = self.agent, self.gang.members
        jobs = [m.job for m in members]
        log.info("gang of %d %s jobs (%s) started", len(jobs), jobs[0]["trainer"],
                 ", ".join(f"{j['id']}/{j['attempt']}" for j in jobs))
        agent.current = self.gang  # from here a SIGTERM stops every member
        try:
            code_root = None
            for job in jobs:  # one grid, so one code_rev; each attempt records what it resolved to
                code_root = agent._pinned_code(job)
        except CodeUnavailable as exc:
            for job in jobs:
                agent._unrunnable(job, str(exc))
            agent.current = None
            return
        except ServerUnavailable as exc:  # nothing ran yet: the leases run out and the jobs are claimed again
            log.warning("gang of %d: left before it started: %s", len(jobs), exc)
            agent.current = None
            return
        alone = solo_reason(jobs[0]["trainer"], code_root)
        if alone:  # the first runs as a solo job; the others go back to the queue at once, for any worker
            log.info("gang of %d: %s; running job %s alone", len(jobs), alone, jobs[0]["id"])
            self._finish(members[1:], None, override=("preempted", f"released unstarted: {alone}"))
            agent.current = None
            agent.run_job(jobs[0])
            return
        for job in jobs:
            agent.sync.job_started(job)
        workdirs = [str(self.options.home / "work" / f"job-{job['id']}") for job in jobs]
        packing = {"member_bytes": dict(agent.member_bytes), "gpu_share": gang_size.gpu_share(self.options.gpus)}
        first = {**jobs[0], gang_size.PACKING: packing}  # what the child's device fit starts from (gang_size.py)
        started = agent.launcher.start_gang(([first, *jobs[1:]], workdirs, str(self.gang_dir),
                                             str(self.options.home / "checkpoints"), self.options.keep_checkpoints,
                                             self.options.stores), code_root)
        child, receiver, stop = started.child, started.receiver, started.stop
        self.stop = stop
        beats = threading.Thread(target=self._heartbeat_loop, daemon=True)
        beats.start()
        kill_at: float | None = None
        while True:
            if receiver.poll(0.2):
                try:
                    for _ in range(DRAIN):
                        self._handle(receiver.recv())
                        if not receiver.poll(0):
                            break
                except EOFError:
                    child.join()
                    break
            elif not child.is_alive():
                break
            self._steer(stop)
            if kill_at is None and all(m.ended or m.told for m in members):
                # every member was told to stop (or is done): the child gets the grace period, as a solo job
                kill_at = time.monotonic() + self.options.grace_seconds
            if all(m.ended for m in members) or (kill_at and time.monotonic() > kill_at):
                if child.is_alive() and not all(m.ended and m.left for m in members):
                    log.warning("gang %s: stopping its child (no member left to train)", jobs[0]["id"])
                    child.kill()
                kill_at = float("inf")
            if agent._time_left() < self.options.grace_seconds:
                self.gang.request_stop("preempted")
        child.join()
        self.finisher.shutdown(wait=True)  # the early ones first: their finishes may still wait on the server
        self.gang.done.set()
        self.gang.wake.set()
        beats.join()
        started.close()  # after the heartbeat thread: it writes verdicts on the stop pipe
        self._finish([m for m in members if not m.ended], child.exitcode)
        agent.current = None

    def _handle(self, message: tuple) -> None:
        if message[0] == "measured":  # (key, bytes): one member's dry step, kept for this agent's later gangs
            self.agent.member_bytes[message[1]] = message[2]
            return
        if message[0] == "fit":  # (fit, asked): the next claims ask for no more than a full device holds
            fit, asked = message[1], message[2]
            self.agent.device_fit = fit if fit < asked else None
            return
        _, index, inner = message
        member = self.gang.members[index]
        if member.ended:
            return  # finished or dropped: what it still says is not ours to send
        if inner[0] == "left":
            member.left = (inner[1], inner[2])
            if inner[1] == "result":
                member.result = inner[2]
            elif inner[1] == "error":
                member.error = inner[2]
        else:
            self.agent._handle_message(member, inner)

    def _steer(self, stop) -> None:
        """Tell the child which members must stop; finish those that left."""
        now = time.monotonic()
        leaving = []
        for i, m in enumerate(self.gang.members):
            if m.ended:
                continue
            if m.stale:  # someone else owns this job now: stop it at once, write nothing more
                stop.drop_member(i)
                m.told, m.ended = "drop", True
                log.warning("job %s: attempt %s is stale (%s); dropped from its gang", m.job["id"],
                            m.job["attempt_id"], m.stale)
                self.agent.sync.job_stale(m.job)
            elif m.left is not None:
                leaving.append(m)
            elif m.stop_reason and m.told is None:
                stop.stop_member(i)
                m.told, m.give_up_at = "stop", now + self.options.grace_seconds
            elif m.give_up_at is not None and now > m.give_up_at:
                log.warning("job %s did not stop within %.0f s; finished without it", m.job["id"],
                            self.options.grace_seconds)
                stop.drop_member(i)
                m.told = "drop"
                leaving.append(m)
        if leaving:
            for m in leaving:
                m.ended = True  # the finisher has it now; the heartbeat thread leaves it alone
            self.finisher.submit(self._finish_logged, leaving)

    def _finish_logged(self, members: list) -> None:
        try:
            self._finish(members, None)
        except Exception:  # noqa: BLE001 - a thread's error would vanish; the leases of these run out
            log.exception("gang: finishing jobs %s failed", ", ".join(str(m.job["id"]) for m in members))

    # ---- heartbeats ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        """As a solo job's: a beat every heartbeat_seconds, and one at once when members wait for verdicts at
        a rung step (members that reached it together asked before the first of them waits: one beat)."""
        while True:
            self.gang.wake.wait(self.agent.heartbeat_seconds)
            self.gang.wake.clear()
            if self.gang.done.is_set():
                return
            with self.gang.send_lock:
                running = [(i, m) for i, m in enumerate(self.gang.members) if not m.ended]
                due = [(i, m, m.take_verdict_due()) for i, m in running]
                if running:
                    self._beat([m for _, m in running])
                for i, m, step in due:
                    if step is not None:
                        self.stop.answer_member(i, step, stop=m.must_stop())

    def _beat(self, members: list) -> bool:
        """One heartbeat_gang for `members` (the caller holds send_lock). False when the server is away."""
        bodies, batches = [], []
        for m in members:
            with m.lock:
                metrics, m.metrics = m.metrics, []
                events, m.events = m.events, []
                bodies.append({"job_id": m.job["id"], "attempt_id": m.job["attempt_id"], "step": m.step,
                               "progress": m.progress, "metrics": metrics, "events": events})
            batches.append((metrics, events))
        client, worker_id = self.agent.client, self.agent.worker_id
        try:
            replies = client.heartbeat_gang(worker_id, bodies)
        except Refused as exc:  # some member's batch can never be stored: drop every batch, say so, keep leases
            log.warning("gang: dropped a heartbeat batch the server cannot store: %s", exc)
            for body, (metrics, events) in zip(bodies, batches):
                body["metrics"] = []
                body["events"] = [{"kind": "metrics_dropped",
                                   "message": f"dropped {len(metrics)} metrics and {len(events)} events: "
                                              f"{str(exc)[:2000]}"}] if metrics or events else []
            try:
                replies = client.heartbeat_gang(worker_id, bodies)
            except Exception as again:  # noqa: BLE001 - the next beat extends the leases
                log.warning("gang heartbeat failed: %s", again)
                return True
        except Exception as exc:  # noqa: BLE001 - keep the data and try again next beat
            unreachable = isinstance(exc, ServerUnavailable)
            if unreachable:
                self._server_away(exc)
            else:
                log.warning("gang heartbeat failed: %s", exc)
            for m, (metrics, events) in zip(members, batches):
                with m.lock:
                    m.metrics[:0] = metrics
                    m.events[:0] = events
            return not unreachable
        if self.gang.unreachable_since is not None:
            log.info("gang: the server answers again after %.0f s; training went on meanwhile",
                     time.monotonic() - self.gang.unreachable_since)
            self.gang.unreachable_since = None
        for m, reply in zip(members, replies):
            if not reply["ok"]:
                m.stale = reply.get("reason") or "heartbeat refused"
            elif stop_asked(reply):
                m.request_stop(stop_asked(reply))
        return True

    def _server_away(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.gang.unreachable_since is None:
            self.gang.unreachable_since = now
        if now - self.gang.outage_logged_at >= OUTAGE_LOG_SECONDS:
            self.gang.outage_logged_at = now
            log.warning("gang heartbeat failed (%s); training goes on, metrics are kept and sent when the server "
                        "answers (%.0f s so far)", exc, now - self.gang.unreachable_since)

    # ---- finishing -----------------------------------------------------------------------------
    def _finish(self, members: list, exitcode: int | None, override: tuple[str, str] | None = None) -> None:
        """Finish these members in one finish_gang, after their last metrics, each by its own outcome."""
        agent = self.agent
        tail = output_tail(self.gang_dir / runner.OUTPUT_LOG)
        ends = []
        for m in members:
            m.ended = True  # from here on the heartbeat thread leaves it to us
            if m.stale:
                agent.sync.job_stale(m.job)
                continue
            outcome, error = override or _outcome(m, exitcode)
            if tail:
                with m.lock:
                    m.events.append({"kind": "output", "message": tail})
            ends.append((m, outcome, error))
        delay = 0.5
        while ends and any(m.metrics or m.events for m, _, _ in ends):
            with self.gang.send_lock:
                if self._beat([m for m, _, _ in ends]):
                    break
            time.sleep(delay)  # the server is away: the outcomes wait for it (the others' beats go on)
            delay = min(delay * 2, 10.0)
        bodies = []
        for m, outcome, error in ends:
            if not m.stale:  # result files; a Hub upload; the attempt's newest pointer recorded (no lock held)
                agent.sync.job_finished(m.job, outcome, m.result, m.step)
            if m.stale:  # refused meanwhile (its last heartbeat, or one of its pointers)
                agent.sync.job_stale(m.job)
                continue
            bodies.append((m, {"job_id": m.job["id"], "attempt_id": m.job["attempt_id"], "outcome": outcome,
                               "result": m.result if outcome == "succeeded" else None, "error": error}))
        if bodies:
            with self.gang.send_lock:
                self._send_finish(bodies)

    def _send_finish(self, bodies: list) -> None:
        client, worker_id = self.agent.client, self.agent.worker_id
        for _ in range(len(bodies) + 1):
            try:
                replies = client.finish_gang(worker_id, [body for _, body in bodies])
                break
            except Refused as exc:  # e.g. one result nested too deep: that member ends as an error saying why
                bad = _member_index(str(exc))
                if bad is None or bad >= len(bodies):
                    for _, body in bodies:
                        _as_error(body, exc)
                else:
                    _as_error(bodies[bad][1], exc)
        else:
            return
        for (m, body), reply in zip(bodies, replies):
            if not reply["ok"]:
                log.warning("job %s: finish refused: %s", m.job["id"], reply.get("reason"))
                continue
            log.info("job %s finished: %s -> %s%s", m.job["id"], body["outcome"], reply.get("state"),
                     logs.job_summary(m.step, body["result"]))


def _outcome(m, exitcode: int | None) -> tuple[str, str | None]:
    """A member's outcome as a solo job's: a stop the agent asked for wins, then a result, else an error."""
    kind = m.left[0] if m.left else None
    if m.stop_reason:
        return m.stop_reason, None
    if kind == "result":
        return "succeeded", None
    if kind in ("stopped", "released"):  # SIGTERM reached the child alone; or the device had no room for it
        return "preempted", None
    if kind == "error":
        return "error", m.error
    return "error", f"the gang's trainer process exited with code {exitcode} and sent no result for this job"


def _member_index(message: str) -> int | None:
    """N of "members.N.<field>" in a refusal."""
    marker = "members."
    at = message.find(marker)
    if at < 0:
        return None
    digits = ""
    for ch in message[at + len(marker):]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def _as_error(body: dict[str, Any], exc: Exception) -> None:
    if body["outcome"] == "succeeded":
        body["outcome"], body["result"] = "error", None
        body["error"] = f"the trainer's result was refused: {exc}"

