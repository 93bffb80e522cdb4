"""Entry point of a job's child process: load the trainer, run it, send back the result or traceback.

A crash here (even a segfault) ends only this process; the agent reports it as the job's error.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from common.checkpoints import LocalStore, StoreOptions
from worker.context import TrainerContext

OUTPUT_LOG = "output.log"
PR_SET_PDEATHSIG = 1


def die_with(parent_pid: int) -> None:
    """Linux: SIGKILL this process when its parent dies (kill -9), so an orphan never keeps training a
    job whose lease will pass to another worker. The parent is the agent, or the agent's warm process
    (worker/warm.py), which dies with the agent the same way."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the next pipe write to the dead agent ends us instead
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _redirect_output(workdir: Path) -> None:
    """Send the trainer's stdout/stderr (also of C extensions) to a file the agent tails."""
    log = open(workdir / OUTPUT_LOG, "wb", buffering=0)  # one attempt per file; older output went out as events
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)


def _json_safe(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise TypeError(f"train() must return a dict of final metrics, got {type(result).__name__}")
    return json.loads(json.dumps(result, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def run_job(job: dict[str, Any], workdir: str, store_root: str, keep: int, conn, stop_event,
            parent_pid: int, stores: StoreOptions | None = None) -> None:
    from worker import trainers

    die_with(parent_pid)
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    _redirect_output(path)
    ctx = TrainerContext(job, conn, stop_event, LocalStore(store_root, keep=keep), path, stores or StoreOptions())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent, which asks us to stop

    def _on_term(_signum, _frame):
        ctx._signalled = True

    signal.signal(signal.SIGTERM, _on_term)
    try:
        module = trainers.load(job["trainer"])
        config = module.Config.model_validate(job["config"])
        print(f"gridfleet: job {job['id']} attempt {job['attempt']} trainer {job['trainer']}", flush=True)
        result = _json_safe(module.train(config, ctx))
        if ctx._signalled:
            # SIGTERM reached this process (alone, or before the agent asked): train() returned because
            # should_stop() said so, so the result may be partial. The agent releases the job as preempted.
            conn.send(("stopped", "preempted"))
        conn.send(("result", result))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit, to the agent
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        conn.send(("error", text))
        conn.close()
        os._exit(1)
    conn.close()
