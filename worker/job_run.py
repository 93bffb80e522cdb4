"""What the agent knows about a running job (`JobRun`), shared by its loop and its heartbeat thread; a gang
(worker/gang_run.py) holds one per member. Also the tail of a child's output log, sent with each finish."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT_TAIL_LINES = 60


@dataclass
class JobRun:
    """What the agent knows about the running job; shared with the heartbeat thread under `lock`."""

    job: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, str]] = field(default_factory=list)
    step: int | None = None
    progress: tuple[float, float] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    stop_reason: str | None = None  # "cancelled" | "preempted" | "pruned"
    stale: str | None = None  # set when the server says this attempt is no longer ours
    unreachable_since: float | None = None  # time.monotonic() of the first heartbeat that did not arrive
    outage_logged_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    # Set to heartbeat now: the child waits for a verdict at a rung step (a gang's members share one).
    wake: threading.Event = field(default_factory=threading.Event)
    verdict_due: int | None = None  # that step, until a heartbeat took it

    def request_stop(self, reason: str) -> None:
        with self.lock:
            self.stop_reason = self.stop_reason or reason

    def ask_verdict(self, step: int) -> None:
        with self.lock:
            self.verdict_due = step
        self.wake.set()

    def take_verdict_due(self) -> int | None:
        """The step a verdict is due at, once: the heartbeat about to go carries its metric."""
        with self.lock:
            step, self.verdict_due = self.verdict_due, None
        return step

    def must_stop(self) -> bool:
        """The verdict after a heartbeat: stop (pruned, cancelled, preempted, or not ours any more)."""
        return bool(self.stop_reason or self.stale)

    def end(self) -> None:
        """The child has exited: the heartbeat thread ends without another beat."""
        self.done.set()
        self.wake.set()

    def find(self, job_id: int, attempt_id: str) -> "JobRun | None":
        """This run when it is that attempt (a gang answers for its members)."""
        return self if (self.job["id"], self.job["attempt_id"]) == (job_id, attempt_id) else None


def output_tail(path: Path, lines: int = OUTPUT_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    with open(path, "r", errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).strip()
