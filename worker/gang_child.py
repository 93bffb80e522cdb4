"""Entry point of a gang's child process: one ctx per member, then the trainer's `train_many`.

Read `run_gang` first. Everything a member's ctx sends goes on the one pipe to the agent tagged with the
member's index: ("m", index, <what a solo child sends>). A member's last word is ("m", index, ("left", kind,
payload)) with kind "result" (a dict), "stopped" (its step), "error" (a traceback) or "released" (did not fit
on the device); the agent finishes it on its own right away (worker/gang_run.py). A trainer may call
`ctx.leave(outcome)` the moment a member is done so that happens while the others still train; whatever it
returns at the end is sent for the members it did not.

Before training, on a CUDA device, `_fit` decides how many members the device holds (one member's dry step,
worker/dry_step.py, unless the agent already knows its bytes) and tells the agent: ("measured", key,
bytes) for its cache, ("fit", fit, asked) for its next claims.

The agent steers members through the stop pipe: a line "s<index>" asks that member to checkpoint and stop
(`ctx.should_stop()` turns true for it only), "d<index>" drops it (its attempt is not ours any more: stop,
write no checkpoint), "c<index>:<step>" answers its wait for a verdict at a rung step: go on
(docs/early_stopping.md). End of file (the agent died) or SIGTERM stops every member.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from common.checkpoints import LocalStore, StoreOptions
from worker import dry_step, gang_size
from worker.context import TrainerContext
from worker.runner import _json_safe, _redirect_output, die_with

POLL_SECONDS = 0.01  # the stop pipe is read at most this often (should_stop is asked per member per step)


class MemberStops:
    """The child's end of the stop pipe: which members were asked to stop, or dropped."""

    def __init__(self, fd: int):
        self._fd = fd
        os.set_blocking(fd, False)
        self.stopped: set[int] = set()
        self.dropped: set[int] = set()
        self.everyone = False  # SIGTERM, or the agent is gone
        self.go_on: dict[int, int] = {}  # member -> the highest step the agent said to go on at
        self._buffer = b""
        self._read_at = 0.0

    def _poll(self, at_once: bool = False) -> None:
        now = time.monotonic()
        if self.everyone or (now - self._read_at < POLL_SECONDS and not at_once):
            return
        self._read_at = now
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return
            if not data:  # end of file: the agent died (its kill -9 kills us too, but do not count on timing)
                self.everyone = True
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                if line[:1] in (b"s", b"d") and line[1:].isdigit():
                    (self.stopped if line[:1] == b"s" else self.dropped).add(int(line[1:]))
                elif line[:1] == b"c":
                    index, _, step = line[1:].partition(b":")
                    if index.isdigit() and step.isdigit():
                        self.go_on[int(index)] = max(self.go_on.get(int(index), 0), int(step))

    def stop(self, index: int) -> bool:
        self._poll()
        return self.everyone or index in self.stopped or index in self.dropped

    def dropped_now(self, index: int) -> bool:
        self._poll()
        return index in self.dropped

    def wait_verdict(self, index: int, step: int, timeout: float) -> bool:
        """Until the agent answers for this member at `step` (go on, or a stop), at most `timeout` seconds.
        False when no answer came."""
        deadline = time.monotonic() + timeout
        while True:
            self._poll(at_once=True)
            if self.stop(index) or self.go_on.get(index, 0) >= step:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self._fd], [], [], left)


class _MemberStop:
    """One member's view of the stop pipe, as a solo child's ChildStop: `is_set` and `wait_verdict`."""

    def __init__(self, stops: MemberStops, index: int):
        self._stops, self._index = stops, index

    def is_set(self) -> bool:
        return self._stops.stop(self._index)

    def wait_verdict(self, step: int, timeout: float) -> bool:
        return self._stops.wait_verdict(self._index, step, timeout)


class _Tagged:
    """The member's view of the gang's pipe: what it sends goes out tagged with its index, until it left."""

    def __init__(self, conn, index: int, member: "MemberContext"):
        self._conn, self._index, self._member = conn, index, member

    def send(self, message: tuple) -> None:
        if not self._member.left and not self._member.dropped:
            self._conn.send(("m", self._index, message))


class MemberContext(TrainerContext):
    """A gang member's ctx: a solo TrainerContext (own job, checkpoints, workdir, seed) whose stop is its own."""

    def __init__(self, index: int, job: dict[str, Any], conn, stops: MemberStops, store: LocalStore,
                 workdir: Path, stores: StoreOptions):
        super().__init__(job, _Tagged(conn, index, self), _MemberStop(stops, index), store, workdir, stores)
        self.index = index
        self.left = False
        self._stops = stops
        self._gang_conn = conn

    @property
    def dropped(self) -> bool:
        return self._stops.dropped_now(self.index)

    def save_checkpoint(self, state: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        if self.dropped:  # another attempt owns this job now: its checkpoints are not ours to write
            return dict(self._job.get("checkpoint") or {})
        return super().save_checkpoint(state, step)

    def leave(self, outcome: Any) -> None:
        """This member is done: a result dict, {"stopped_at": step}, or the exception that ended it."""
        if self.left:
            return
        kind, payload = _word(outcome, self.job_id)
        if not self.dropped:
            self._gang_conn.send(("m", self.index, ("left", kind, payload)))
        self.left = True


def _word(outcome: Any, job_id: int) -> tuple[str, Any]:
    if isinstance(outcome, BaseException):
        text = "".join(traceback.format_exception(type(outcome), outcome, outcome.__traceback__))
        print(f"gridfleet: job {job_id} failed:\n{text}", file=sys.stderr, flush=True)
        return "error", text
    if isinstance(outcome, dict) and set(outcome) == {"stopped_at"}:
        return "stopped", outcome["stopped_at"]
    if outcome == "released":
        return "released", None
    try:
        return "result", _json_safe(outcome)
    except (TypeError, ValueError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"


def run_gang(jobs: list[dict[str, Any]], workdirs: list[str], gang_dir: str, store_root: str, keep: int, conn,
             stop_fd: int, parent_pid: int, stores: StoreOptions | None = None) -> None:
    from worker import trainers

    die_with(parent_pid)
    root = Path(gang_dir)
    root.mkdir(parents=True, exist_ok=True)
    _redirect_output(root)  # one output log for the gang: its tail goes with each member's finish
    stops = MemberStops(stop_fd)
    store = LocalStore(store_root, keep=keep)
    ctxs = []
    for i, (job, workdir) in enumerate(zip(jobs, workdirs)):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        ctxs.append(MemberContext(i, job, conn, stops, store, Path(workdir), stores or StoreOptions()))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent, which asks every member to stop

    def _on_term(_signum, _frame):
        for ctx in ctxs:
            ctx._signalled = True

    signal.signal(signal.SIGTERM, _on_term)
    try:
        trainer = jobs[0]["trainer"]
        module = trainers.load(trainer)
        print(f"gridfleet: gang of {len(jobs)} ({trainer}): jobs " + ", ".join(
            f"{j['id']} attempt {j['attempt']}" for j in jobs), flush=True)
        cfgs = [module.Config.model_validate(job["config"]) for job in jobs]
        fused = trainers.load_fused(trainer)
        key = dry_step.cache_key(trainer, getattr(module, "fuse_key", lambda _cfg: None)(cfgs[0]))
        fit = _fit(fused, cfgs, ctxs, key, jobs[0].get(gang_size.PACKING))
        for ctx in ctxs[fit:]:
            ctx.leave("released")
        cfgs, ctxs = cfgs[:fit], ctxs[:fit]
        if fused is None:  # the agent sends gangs only of trainers that train them (gang_run.solo_reason)
            raise RuntimeError(f"trainer '{trainer}' has no train_many")
        for ctx, outcome in zip(ctxs, fused.train_many(cfgs, ctxs)):
            ctx.leave(outcome)  # a no-op for those train_many let leave already
    except BaseException as exc:  # noqa: BLE001 - report everything, including SystemExit, to the agent
        for ctx in ctxs:
            ctx.leave(exc)
        conn.close()
        os._exit(1)
    conn.close()


def _fit(fused, cfgs: list, ctxs: list, key: str = "", packing: dict | None = None, memory=None) -> int:
    """How many members train here: on a CUDA device, as many as its memory holds (worker/gang_size.py: one
    member's bytes from the trainer's hook, the agent's cache `packing["member_bytes"]` or a dry step); the
    rest are released to be claimed again. `memory`: dry_step.CudaMemory unless given (tests)."""
    if fused is None or not str(ctxs[0].device).startswith("cuda"):
        return len(cfgs)
    packing = packing or {}
    conn = ctxs[0]._gang_conn
    try:
        memory = memory or dry_step.CudaMemory(ctxs[0].device)
        member, measured = gang_size.member_bytes(fused, cfgs[0], ctxs[0], key, packing.get("member_bytes") or {},
                                                  memory)
        free, total = memory.free()
    except dry_step.DryStepFailed as exc:
        if not exc.out_of_memory:  # a failed measurement must not fail the gang: train them all
            print(f"gridfleet: one member's dry step failed ({exc}); training all {len(cfgs)}", flush=True)
            return len(cfgs)
        print(f"gridfleet: one member alone does not fit ({exc}): it trains alone", flush=True)
        member, measured, (free, total) = 1, False, (0, 0)
    except Exception as exc:  # noqa: BLE001 - as above: a broken hook or memory reading trains every member
        print(f"gridfleet: measuring one member failed ({type(exc).__name__}: {exc}); training all "
              f"{len(cfgs)}", flush=True)
        return len(cfgs)
    if measured:  # the agent keeps it: later gangs of this shape skip the dry step
        conn.send(("measured", key, member))
    fit = gang_size.fit_on_device(len(cfgs), member, gang_size.budget(free, total, packing.get("gpu_share")))
    print(f"gridfleet: one member needs {member / 2**20:.1f} MiB ({'dry step' if measured else 'known'}), "
          f"{free / 2**20:.0f} MiB free: {fit} of {len(cfgs)} members fit", flush=True)
    conn.send(("fit", fit, len(cfgs)))
    return fit
