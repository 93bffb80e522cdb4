"""A trainer ctx for benches: what `train()` and `train_many()` call, in memory (reports kept, events
printed, no checkpoints written or read, never asked to stop)."""
from __future__ import annotations

from typing import Any


class MemoryContext:
    def __init__(self, device: str, seed: int = 0):
        self.seed, self.device = seed, device
        self.reports: list[tuple[int, dict]] = []

    def report(self, step: int, **metrics: Any) -> None:
        self.reports.append((step, metrics))

    def progress(self, done: float, total: float) -> None:
        pass

    def event(self, kind: str, message: str) -> None:
        print(f"  event {kind}: {message}")

    def save_checkpoint(self, state: dict, step: int | None = None) -> dict:
        return {}

    def load_checkpoint(self) -> None:
        return None

    def should_stop(self) -> bool:
        return False
