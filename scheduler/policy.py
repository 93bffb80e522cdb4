"""Retry policy: a budget and a backoff per failure kind."""
from __future__ import annotations

from dataclasses import dataclass

FAILURE_KINDS = ("error", "lost", "preempted", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "pruned")  # pruned: stopped early by the grid's rule
JOB_STATES = ("queued", "running", *TERMINAL_STATES)


@dataclass(frozen=True)
class RetryPolicy:
    lease_seconds: float = 60.0
    max_lost: int = 5  # the job fails at its max_lost-th lost lease (like max_attempts for errors)
    max_preemptions: int = 1000  # preemption never uses the error budget, but a loop must end
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 600.0

    def backoff(self, kind: str, count: int) -> float:
        """Seconds before the job may run again after its `count`-th failure of `kind`.

        error: base * 2^(n-1). lost: the expired lease already waited, so the first loss retries at
        once, then base * 2^(n-2). preempted: at once, always (the worker was told to go away).
        """
        if kind == "preempted" or count <= 0:
            return 0.0
        exponent = count - 1 if kind == "error" else count - 2
        if exponent < 0:
            return 0.0
        return min(self.backoff_max_seconds, self.backoff_base_seconds * 2.0**exponent)

    @classmethod
    def from_settings(cls, settings) -> "RetryPolicy":
        return cls(
            lease_seconds=settings.lease_seconds,
            max_lost=settings.max_lost,
            max_preemptions=settings.max_preemptions,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
        )
