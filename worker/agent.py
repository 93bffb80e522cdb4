"""The worker agent: register, then claim -> run the job in a child process -> finish, until told to stop.

Read top to bottom: `Agent.run` is the loop, `Agent.run_job` one job; a claim of several jobs (a gang, when
a served trainer trains gangs: docs/gang_claims.md) runs in worker/gang_run.py instead. Heartbeats go from a side thread
(`_heartbeat_loop`), never from the training loop. The child is forked from a warm process that has torch
and the trainers imported (worker/warm.py), or spawned cold when there is none. SIGTERM/SIGINT ask the
running job to checkpoint and stop; after `grace_seconds` the child is killed, and the job is released as
`preempted` either way.
While the API cannot be reached the job trains on: heartbeats keep their metrics and retry every beat,
checkpoint pointers are recorded later (worker/pointers.py), a finish waits for the server. On reconnect
the server either gives the job back to this attempt or answers 409, and the child is killed at once.
"""
from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.checkpoints import StoreOptions
from worker import gang_size, logs, runner, self_update
from worker.code_cache import CodeUnavailable
from worker.checkpoint_sync import CheckpointSync
from worker.client import Refused, ServerUnavailable
from worker.gang_run import GangRun, GangRunner
from worker.job_run import JobRun, output_tail
from worker.warm import Launcher

log = logging.getLogger("gridfleet.worker")
MAX_BUFFERED_METRICS = 10_000
MAX_BUFFERED_EVENTS = 1_000
OUTAGE_LOG_SECONDS = 30.0  # while the server is away, say so at most this often


@dataclass
class AgentOptions:
    name: str = field(default_factory=socket.gethostname)
    trainers: list[str] | None = None  # None: every trainer this install knows
    gpus: float | None = None  # GPU capacity offered; None: the number of GPUs seen
    can_pin_code: bool = False
    max_jobs: int | None = None
    max_run_time: float | None = None  # seconds this agent may live (rented machines with free hours)
    min_job_time: float = 120.0  # do not claim when less time than this is left
    grace_seconds: float = 30.0
    # An idle worker polls at most this far apart: a lost job is re-claimed soon after its lease ends.
    idle_sleep_max: float = 2.0
    home: Path = Path(".gridfleet")
    keep_checkpoints: int = 3
    stores: StoreOptions = field(default_factory=StoreOptions)  # checkpoint stores and Hub access
    warm_starts: bool = True  # fork job children from a pre-imported process (worker/warm.py); False: spawn
    # Claim up to this many jobs as one gang when a served trainer trains gangs (trainers.FUSED); 1: one at a
    # time. `gridfleet worker`/`run` pass the gang_size setting (worker/gang_size.py, docs/gang_claims.md).
    max_gang: int = 8


def visible_gpus() -> list[str]:
    """GPU names from nvidia-smi (no torch import in the agent); empty on CPU machines."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU")]


def code_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             check=True, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Agent:
    def __init__(self, client, options: AgentOptions, updater=None, code_cache=None):
        from worker import trainers

        self.client = client
        self.options = options
        self.trainers = options.trainers or trainers.known_trainers()
        self.stopping = False
        self.current: JobRun | GangRun | None = None
        self.started = time.monotonic()
        self.jobs_done = 0
        self.worker_id: str | None = None
        self.heartbeat_seconds = 5.0
        self.claim_filters: dict[str, Any] = {}  # extra claim filters (embedded mode: its grid_id)
        self.capacity = 0.0  # GPUs this worker offers a claim
        self.next_job: dict[str, Any] | None = None  # claimed with the last finish (embedded mode: _end)
        self.launcher = Launcher(self.trainers, warm=options.warm_starts)  # starts each job's child
        self.updater = updater  # worker/self_update.SelfUpdater: checked between jobs
        self.code_cache = code_cache  # worker/code_cache.CodeCache: worktrees for jobs with a pinned code_rev
        self.update_report: dict[str, Any] | None = None  # the last self-update outcome, shown in registration
        self.reexec_pending = False
        self.gpus: list[str] = []
        # Gangs only where one of our trainers trains them; the FUSED table is read without importing torch.
        self.gangs = options.max_gang > 1 and any(name in trainers.FUSED for name in self.trainers)
        self.server_gang_limit: int | None = None  # the server's max_gang_jobs, from the registration reply
        self.device_fit: int | None = None  # members the last gang's device held (worker/gang_child.py)
        self.member_bytes: dict[str, int] = {}  # one member's measured bytes by trainer and fuse key (dry_step.py)
        self.sync = CheckpointSync(client, options.stores, options.home / "checkpoints", options.name)
        self.sync.pointers.on_stale = self._pointer_refused

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.launcher.close()  # before a re-exec too: the new code starts warm processes of its own

    def _run(self) -> int:
        self._install_signal_handlers()
        self._resume_after_reexec()
        self.launcher.prewarm()  # its imports overlap registering and the first claim
        self.gpus = gpus = visible_gpus()
        self.code_rev = code_revision()
        reply = self.client.register(self._registration())
        self.worker_id = self.sync.worker_id = reply["worker_id"]
        self.sync.worker_secret = reply.get("worker_secret")  # kept in memory (and pending uploads' journals)
        self.heartbeat_seconds = float(reply.get("heartbeat_seconds", 5.0))
        self.server_gang_limit = reply.get("max_gang_jobs")
        if self.update_report:  # re-exec'd on a new commit: say so on the new registration too
            self._report_update()
        self.sync.resume_pending()  # uploads an earlier agent here left when it was killed
        self.capacity = capacity = float(len(gpus)) if self.options.gpus is None else self.options.gpus
        log.info("worker %s registered (trainers: %s; gpus: %s)", self.worker_id, ", ".join(self.trainers), capacity)
        idle = 0.5
        while not self.stopping:
            if self.options.max_jobs is not None and self.jobs_done >= self.options.max_jobs:
                log.info("done %d jobs (--max-jobs); stopping", self.jobs_done)
                break
            if self._time_left() < self.options.min_job_time:
                log.info("less than %.0f s left of --max-run-time; not claiming more", self.options.min_job_time)
                break
            if self.updater is not None and self._self_update():
                break  # re-exec on the new commit once the loop has closed up
            self.launcher.wait_warm(lambda: self.stopping)  # once: a claimed job's lease is not spent importing
            try:
                jobs = self._claim(capacity)
                if not jobs:
                    self.client.heartbeat(self.worker_id)  # idle, but alive
            except ServerUnavailable as exc:  # a long API outage: an idle worker waits it out
                log.warning("%s; still trying", exc)
                jobs = []
            if not jobs:
                self._sleep(idle)
                idle = min(idle * 2, self.options.idle_sleep_max)
                continue
            idle = 0.5
            if len(jobs) == 1:
                self.run_job(jobs[0])
            else:
                GangRunner(self, jobs).run()  # one child trains them all (worker/gang_run.py)
            self.jobs_done += len(jobs)
        self._release_next_job()
        self.sync.close()
        self.client.close()
        if self.reexec_pending:
            self.launcher.close()
            self_update.reexec()  # same pid and command line, new code; does not return
        return 0

    def _claim(self, capacity: float) -> list[dict[str, Any]]:
        """One claim: a gang of up to K jobs when our trainers train gangs, else one job. [] when none."""
        if self.next_job is not None:  # the last job's finish claimed it (embedded mode: _end)
            job, self.next_job = self.next_job, None
            return [job]
        filters = self._claim_filters(capacity)
        k = self._gang_size(self.jobs_done)
        if k > 1:
            try:
                return self.client.claim_gang(self.worker_id, k, **filters)
            except Refused as exc:  # a server that takes fewer (or no) gangs: one job at a time from now on
                log.warning("gang claims refused (%s); claiming one job at a time", exc)
                self.gangs = False
        job = self.client.claim(self.worker_id, **filters)
        return [] if job is None else [job]

    def _claim_filters(self, capacity: float) -> dict[str, Any]:
        return dict(trainers=self.trainers, gpus=capacity, can_pin_code=self.options.can_pin_code,
                    code_rev=self.code_rev, **self.claim_filters)

    def _gang_size(self, jobs_done: int) -> int:
        """How many jobs the claim after `jobs_done` jobs asks for (1: a single claim)."""
        if not self.gangs:
            return 1
        left = None if self.options.max_jobs is None else self.options.max_jobs - jobs_done
        return gang_size.claim_size(self.options.max_gang, self.server_gang_limit, left, self.device_fit)

    def _claim_with_finish(self) -> dict[str, Any] | None:
        """The claim filters when the finish of the job now ending may claim the next one in the same call
        (DirectClient.finish_and_claim: one transaction on SQLite): only where the loop would claim one job
        right after it. None: the loop decides (API mode, stopping, the last of --max-jobs, too little time
        left, a self-update to check, a gang next)."""
        if not hasattr(self.client, "finish_and_claim") or self.stopping or self.updater is not None:
            return None
        done = self.jobs_done + 1  # the job now ending is counted when run_job returns
        if self.options.max_jobs is not None and done >= self.options.max_jobs:
            return None
        if self._time_left() < self.options.min_job_time or self._gang_size(done) > 1:
            return None
        return self._claim_filters(self.capacity)

    def _release_next_job(self) -> None:
        """A job claimed with the last finish that the loop will not run (it stopped meanwhile) goes back to
        the queue at once, as a stop during it would send it: preempted."""
        job, self.next_job = self.next_job, None
        if job is not None:
            reply = self.client.finish(self.worker_id, job_id=job["id"], attempt_id=job["attempt_id"],
                                       outcome="preempted")
            log.info("job %s released unstarted: preempted -> %s", job["id"], reply.get("state"))

    # ---- self-update (worker/self_update.py) ---------------------------------------------------
    def _registration(self) -> dict[str, Any]:
        resources = {"self_update": self.update_report} if self.update_report else {}
        return {"name": self.options.name, "host": socket.gethostname(), "gpus": self.gpus,
                "trainers": self.trainers, "resources": resources, "code_rev": self.code_rev}

    def _resume_after_reexec(self) -> None:
        """After our own re-exec: keep the --max-run-time clock and --max-jobs count, report the update."""
        handoff = self_update.read_handoff(self.options.home)
        if handoff:
            self.started, self.jobs_done = handoff["started"], handoff["jobs_done"]
            self.update_report = handoff["last"]
            log.info("self-update: now running %s (%s)", handoff["last"]["new"], handoff["last"]["message"])

    def _self_update(self) -> bool:
        """Between jobs. True: a new commit is checked out and imports; the agent re-execs on it. Otherwise
        (refused, rolled back) it keeps serving on its revision and records a worker event saying why
        (GET /workers/{id}/events; GET /workers shows the last outcome in resources.self_update)."""
        result = self.updater.due()
        if result is None or self.stopping:
            return False
        if result.state == "updated":
            self_update.write_handoff(self.options.home, self.started, self.jobs_done, result.report())
            self.reexec_pending = True
            return True
        self.update_report = result.report()
        self._report_update()
        log.info("self-update %s: still on %s", result.state, (self.code_rev or "?")[:12])
        return False

    def _report_update(self) -> None:
        report = self.update_report or {}
        try:
            self.client.worker_event(self.worker_id, f"self_update_{report.get('state', 'unknown')}",
                                     report.get("message", ""), resources=self._registration()["resources"])
        except ServerUnavailable as exc:  # an API outage must not end the agent; the next registration says it
            log.warning("self-update %s not reported: %s", report.get("state", "unknown"), exc)

    # ---- one job -------------------------------------------------------------------------------
    def run_job(self, job: dict[str, Any]) -> None:
        run = JobRun(job=job)
        self.current = run
        log.info("job %s attempt %s (%s) started", job["id"], job["attempt"], job["trainer"])
        try:
            code_root = self._pinned_code(job)  # None: this checkout's own code
        except CodeUnavailable as exc:
            self._unrunnable(job, str(exc))
            self.current = None
            return
        except ServerUnavailable as exc:  # nothing ran yet: the lease runs out and the job is claimed again
            log.warning("job %s: left before it started: %s", job["id"], exc)
            self.current = None
            return
        workdir = self.options.home / "work" / f"job-{job['id']}"
        self.sync.job_started(job)
        started = self.launcher.start((job, str(workdir), str(self.options.home / "checkpoints"),
                                       self.options.keep_checkpoints, self.options.stores), code_root)
        child, receiver, stop_event = started.child, started.receiver, started.stop
        heartbeats = threading.Thread(target=self._heartbeat_loop, args=(run, stop_event), daemon=True)
        heartbeats.start()
        kill_at: float | None = None
        while True:
            if receiver.poll(0.2):
                try:
                    self._handle_message(run, receiver.recv())
                except EOFError:
                    child.join()
                    break
            elif not child.is_alive():
                break
            if run.stale:
                child.kill()  # someone else owns this job now: stop at once, write nothing
            elif run.stop_reason and not stop_event.is_set():
                stop_event.set()
                kill_at = time.monotonic() + self.options.grace_seconds
            elif kill_at and time.monotonic() > kill_at:
                log.warning("job %s did not stop within %.0f s; killing it", job["id"], self.options.grace_seconds)
                child.kill()
                kill_at = None
            if self._time_left() < self.options.grace_seconds:
                run.request_stop("preempted")
        child.join()
        run.end()
        heartbeats.join()
        started.close()  # after the heartbeat thread: it writes verdicts on the stop pipe
        self._finish(run, child.exitcode, workdir)
        self.current = None

    def _pinned_code(self, job: dict[str, Any]) -> Path | None:
        """The worktree of the job's pinned code_rev (made or fetched when missing); the attempt records
        the full sha it resolves to."""
        rev = job.get("code_rev")
        if not rev:
            return None
        if self.code_cache is None:
            raise CodeUnavailable(f"code_rev '{rev}': this worker cannot run pinned code (not a git checkout)")
        sha, path = self.code_cache.worktree(rev)
        reply = self.client.record_code_rev(self.worker_id, job["id"], job["attempt_id"], sha)
        if not reply["ok"]:
            raise CodeUnavailable(reply.get("reason") or "recording the code_rev was refused")
        log.info("job %s runs code_rev %s = %s from %s", job["id"], rev, sha, path)
        return path

    def _unrunnable(self, job: dict[str, Any], error: str) -> None:
        log.error("job %s: %s", job["id"], error)
        reply = self.client.finish(self.worker_id, job_id=job["id"], attempt_id=job["attempt_id"], outcome="error",
                                   error=error)
        log.info("job %s finished: error -> %s", job["id"], reply.get("state"))

    def _handle_message(self, run: JobRun, message: tuple) -> None:
        kind = message[0]
        if kind == "report":
            _, step, values, when = message
            with run.lock:
                run.step = step
                if len(run.metrics) < MAX_BUFFERED_METRICS:
                    run.metrics.append({"step": step, "time": when, "values": values})
        elif kind == "progress":
            with run.lock:
                run.progress = (message[1], message[2])
        elif kind == "event":
            with run.lock:
                run.events.append({"kind": message[1], "message": message[2]})
        elif kind == "checkpoint":
            self.sync.checkpoint_saved(run.job, message[1])  # never waits: a refusal comes via _pointer_refused
        elif kind == "verdict?":  # the child waits at a rung step: heartbeat now (docs/early_stopping.md)
            run.ask_verdict(message[1])
        elif kind == "stopped":  # the child was signalled and stopped early: not a success
            run.request_stop(message[1])
        elif kind == "result":
            run.result = message[1]
        elif kind == "error":
            run.error = message[1]

    def _pointer_refused(self, job_id: int, attempt_id: str, reason: str) -> None:
        current = self.current  # the agent's loop may end it meanwhile
        run = current.find(job_id, attempt_id) if current is not None else None
        if run is not None:
            run.stale = reason
        else:  # an upload that landed after its attempt ended, and not the one that succeeded
            log.info("job %s: checkpoint of attempt %s not recorded: %s", job_id, attempt_id, reason)

    def _heartbeat_loop(self, run: JobRun, stop) -> None:
        """A beat every heartbeat_seconds, and one at once when the child waits for a verdict at a rung step:
        its answer (stop, or go on: also when the beat failed) goes back on the stop pipe."""
        while True:
            run.wake.wait(self.heartbeat_seconds)
            run.wake.clear()
            if run.done.is_set():
                return
            due = run.take_verdict_due()
            self._send_heartbeat(run)
            if due is not None and hasattr(stop, "answer"):  # a pinned commit's cold child has an Event
                stop.answer(due, stop=run.must_stop())

    def _send_heartbeat(self, run: JobRun) -> bool:
        """One try. False when the server could not be reached (the data stays buffered for the next try)."""
        with run.lock:
            metrics, run.metrics = run.metrics, []
            events, run.events = run.events, []
            step, progress = run.step, run.progress
        try:
            reply = self.client.heartbeat(self.worker_id, job_id=run.job["id"], attempt_id=run.job["attempt_id"],
                                          step=step, progress=progress, metrics=metrics, events=events)
        except Refused as exc:  # this batch can never be stored: drop it, say so on the job, keep the lease
            reply = self._drop_batch(run, metrics, events, str(exc))
            if reply is None:
                return True  # nothing is left to resend: the next beat extends the lease
        except Exception as exc:  # noqa: BLE001 - keep the data and try again next beat
            unreachable = isinstance(exc, ServerUnavailable)
            if unreachable:
                self._server_away(run, exc)
            else:
                log.warning("heartbeat for job %s failed: %s", run.job["id"], exc)
            with run.lock:
                run.metrics[:0] = metrics[: MAX_BUFFERED_METRICS - len(run.metrics)]
                run.events[:0] = events[: MAX_BUFFERED_EVENTS - len(run.events)]
            return not unreachable
        if run.unreachable_since is not None:
            log.info("job %s: the server answers again after %.0f s; training went on meanwhile",
                     run.job["id"], time.monotonic() - run.unreachable_since)
            run.unreachable_since = None
        if not reply["ok"]:
            run.stale = reply.get("reason") or "heartbeat refused"
        elif reply.get("cancel"):
            run.request_stop("cancelled")
        elif reply.get("prune"):  # the grid's early-stopping rule: stop as for a cancel, finish as pruned
            run.request_stop("pruned")
        return True

    def _server_away(self, run: JobRun, exc: Exception) -> None:
        now = time.monotonic()
        if run.unreachable_since is None:
            run.unreachable_since = now
        if now - run.outage_logged_at >= OUTAGE_LOG_SECONDS:
            run.outage_logged_at = now
            log.warning("heartbeat for job %s failed (%s); training goes on, metrics are kept and sent when the "
                        "server answers (%.0f s so far)", run.job["id"], exc, now - run.unreachable_since)

    def _drop_batch(self, run: JobRun, metrics: list, events: list, reason: str) -> dict[str, Any] | None:
        """Send the heartbeat again without the refused batch, with an event saying what was dropped and why.
        None when that fails too (the next beat tries again, without the batch)."""
        log.warning("job %s: dropped %d metrics and %d events the server cannot store: %s",
                    run.job["id"], len(metrics), len(events), reason)
        note = {"kind": "metrics_dropped",
                "message": f"dropped {len(metrics)} metrics and {len(events)} events: {reason[:2000]}"}
        try:
            return self.client.heartbeat(self.worker_id, job_id=run.job["id"], attempt_id=run.job["attempt_id"],
                                         step=run.step, progress=run.progress, metrics=[], events=[note])
        except Exception as exc:  # noqa: BLE001 - the lease is extended by the next beat
            log.warning("heartbeat for job %s failed: %s", run.job["id"], exc)
            return None

    def _finish(self, run: JobRun, exitcode: int | None, workdir: Path) -> None:
        job = run.job
        if run.stale:
            log.warning("job %s: attempt %s is stale (%s); not finishing it", job["id"], job["attempt_id"], run.stale)
            self.sync.job_stale(job)
            return
        if run.stop_reason:
            outcome, error = run.stop_reason, None
        elif run.result is not None:
            outcome, error = "succeeded", None
        else:
            outcome = "error"
            error = run.error or f"the trainer process exited with code {exitcode} and sent no result"
        tail = output_tail(workdir / runner.OUTPUT_LOG)
        if tail:
            with run.lock:
                run.events.append({"kind": "output", "message": tail})
        delay = 0.5
        while (run.metrics or run.events) and not self._send_heartbeat(run):  # flush what is left, fenced
            time.sleep(delay)  # the server is away: the outcome waits for it
            delay = min(delay * 2, 10.0)
        if run.stale:  # its last heartbeat was refused: the child ended before the agent heard (an outage)
            log.warning("job %s: attempt %s is stale (%s); not finishing it", job["id"], job["attempt_id"], run.stale)
            self.sync.job_stale(job)
            return
        self.sync.job_finished(job, outcome, run.result, run.step)
        if run.stale:  # a pointer of this attempt was refused meanwhile
            return
        try:
            reply = self._end(job, outcome, run.result if outcome == "succeeded" else None, error)
        except Refused as exc:  # e.g. a result nested too deep: the attempt ends as an error that says why
            outcome = "error"
            reply = self.client.finish(self.worker_id, job_id=job["id"], attempt_id=job["attempt_id"],
                                       outcome=outcome, error=f"the trainer's result was refused: {exc}")
        log.info("job %s finished: %s -> %s%s", job["id"], outcome, reply.get("state"),
                 logs.job_summary(run.step, run.result if outcome == "succeeded" else None))

    def _end(self, job: dict[str, Any], outcome: str, result: dict[str, Any] | None, error: str | None) -> dict:
        """Finish the attempt; in embedded mode claim the next job with it (self.next_job) when the loop would."""
        claim = self._claim_with_finish()
        if claim is None:
            return self.client.finish(self.worker_id, job_id=job["id"], attempt_id=job["attempt_id"],
                                      outcome=outcome, result=result, error=error)
        reply, self.next_job = self.client.finish_and_claim(self.worker_id, job_id=job["id"],
                                                            attempt_id=job["attempt_id"], outcome=outcome,
                                                            result=result, error=error, claim=claim)
        return reply

    # ---- stopping ------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        log.info("signal %s: finishing up (running job checkpoints and is released as preempted)", signum)
        self.stop()

    def stop(self) -> None:
        self.stopping = True
        if self.current is not None:
            self.current.request_stop("preempted")

    def _time_left(self) -> float:
        if self.options.max_run_time is None:
            return float("inf")
        return self.options.max_run_time - (time.monotonic() - self.started)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))


