"""The `ctx` a trainer receives. It lives in the job's child process and talks to the agent by a pipe.

Trainers call report/progress/save_checkpoint freely; the agent batches metrics into heartbeats sent
from its own side thread, so nothing here touches the network or the database.

Exact rung stops (docs/early_stopping.md): the claimed job names the steps its grid's prune rule decides at
(`prune_steps`). The first report at or past one also asks the agent for the verdict (the agent heartbeats
at once); the next `should_stop` waits for the answer, at most VERDICT_WAIT_SECONDS, before the trainer
goes on; after one wait in vain it waits no more (a slow or unreachable scheduler costs a job one wait at
most). The wait sits in should_stop, not in report, so that a gang's members all report (and ask) first
and one gang heartbeat, rarely two, answers them all.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from common.checkpoints import LocalStore, StoreOptions
from common.stores import load_checkpoint


# How long a child waits for a verdict at a rung step: a heartbeat's round trip and one decision, with room
# for a loaded server. When it passes (the server is slow or away) the job goes on, as without the wait.
VERDICT_WAIT_SECONDS = 3.0


def _plain(value: Any) -> Any:
    """Metrics as plain JSON numbers (tensors and numpy scalars have .item())."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrainerContext:
    def __init__(self, job: dict[str, Any], conn, stop_event, store: LocalStore, workdir: Path,
                 stores: StoreOptions | None = None):
        self.job_id: int = job["id"]
        self.grid_id: int = job["grid_id"]
        self.seed: int = job["seed"]
        self.attempt: int = job["attempt"]
        self.workdir = workdir
        self._job = job
        self._conn = conn
        self._stop_event = stop_event
        self._store = store  # new checkpoints are written here first, whatever the job's store
        self._stores = stores or StoreOptions()  # to read a checkpoint another machine uploaded
        self._signalled = False  # set by the child's SIGTERM handler
        self._last_step = 0
        self._device: str | None = None
        # Verdicts come on the stop pipe (worker/warm.py's ChildStop); a plain Event carries none: no waits.
        judged = sorted(job.get("prune_steps") or []) if hasattr(stop_event, "wait_verdict") else []
        self._judge_steps = judged
        self._due: int | None = None  # a reported step whose verdict the next should_stop waits for

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def report(self, step: int, **metrics: Any) -> None:
        self._last_step = int(step)
        self._conn.send(("report", int(step), {k: _plain(v) for k, v in metrics.items()}, time.time()))
        if self._judge_steps and self._judge_steps[0] <= step:
            while self._judge_steps and self._judge_steps[0] <= step:  # one verdict for every rung it passed
                self._judge_steps.pop(0)
            self._due = int(step)
            self._conn.send(("verdict?", self._due))

    def progress(self, done: float, total: float) -> None:
        self._conn.send(("progress", float(done), float(total)))

    def event(self, kind: str, message: str) -> None:
        self._conn.send(("event", kind, message))

    def save_checkpoint(self, state: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Write the checkpoint durably, then hand its pointer to the agent, which records it on the job
        (or, for a Hub store, uploads it in the background and records the Hub pointer)."""
        step = int(state.get("step", self._last_step) if step is None else step)
        pointer = self._store.save(self.grid_id, self.job_id, step, state)
        self._job["checkpoint"] = pointer
        self._conn.send(("checkpoint", pointer))
        return pointer

    def load_checkpoint(self) -> dict[str, Any] | None:
        pointer = self._job.get("checkpoint")
        return None if not pointer else load_checkpoint(pointer, self._store.root, self._stores)

    def should_stop(self) -> bool:
        """True when the job must checkpoint and return: preempted, cancelled, pruned or out of time."""
        if self._due is not None:
            step, self._due = self._due, None
            if not self._stop_event.wait_verdict(step, VERDICT_WAIT_SECONDS):
                self._judge_steps = []  # no answer in time: the scheduler is slow or away; no more waits
        return self._signalled or self._stop_event.is_set()
