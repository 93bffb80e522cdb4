"""Run a trainer in this process with a real TrainerContext and LocalStore; a thread drains its pipe so
the trainer never blocks, and keeps every message for the test to read."""
from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any, Callable

from common.checkpoints import LocalStore
from worker.context import TrainerContext


class StopAtStep(TrainerContext):
    """A real context that also asks to stop once a step >= `stop_at` was reported (like a preemption)."""

    stop_at: int | None = None

    def should_stop(self) -> bool:
        return super().should_stop() or (self.stop_at is not None and self._last_step >= self.stop_at)


class Harness:
    def __init__(self, root: Path, workdir: str = "work", checkpoint: dict | None = None, seed: int = 0,
                 stop_at: int | None = None, job_id: int = 7):
        self.receiver, sender = multiprocessing.Pipe(duplex=False)
        self.stop_event = multiprocessing.Event()
        job = {"id": job_id, "grid_id": 1, "seed": seed, "attempt": 1, "checkpoint": checkpoint}
        self.store = LocalStore(root / "store", keep=100)
        self.ctx = StopAtStep(job, sender, self.stop_event, self.store, root / workdir)
        self.ctx.stop_at = stop_at
        self.messages: list[tuple] = []
        self.on_message: Callable[["Harness", tuple], Any] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._done.is_set() or self.receiver.poll():
            if self.receiver.poll(0.02):
                message = self.receiver.recv()
                self.messages.append(message)
                if self.on_message is not None:
                    self.on_message(self, message)

    def train(self, module, config: dict) -> Any:
        """`module.train` on `config` (validated by `module.Config`), then stop draining."""
        try:
            return module.train(module.Config.model_validate(config), self.ctx)
        finally:
            self.close()

    def close(self) -> None:
        """Stop draining once the pipe is empty: every message sent so far is in `messages`."""
        self._done.set()
        self._thread.join(timeout=10)

    def of(self, kind: str) -> list[tuple]:
        return [m[1:] for m in self.messages if m[0] == kind]

    @property
    def reports(self) -> list[tuple[int, dict]]:
        return [(step, values) for step, values, _when in self.of("report")]

    @property
    def checkpoints(self) -> list[dict]:
        return [pointer for (pointer,) in self.of("checkpoint")]
