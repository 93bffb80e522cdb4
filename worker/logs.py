"""A worker's log: one line per job event (claimed, finished, preempted, ...) from worker/agent.py, and no
line per HTTP request: httpx logs every request at INFO, several a second per worker with heartbeats."""
from __future__ import annotations

import logging

QUIET = ("httpx", "httpcore")  # their warnings still show


def configure(level: int = logging.INFO, **basic) -> None:
    logging.basicConfig(level=level, format=basic.pop("format", "%(asctime)s %(name)s %(message)s"), **basic)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def job_summary(step: int | None, result: dict | None, most: int = 4) -> str:
    """` (step 40; loss=0.025, steps=40)`: what a finished job's log line adds; numbers only, no curves."""
    numbers = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in (result or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)][:most]
    parts = ([f"step {step}"] if step is not None else []) + ([", ".join(numbers)] if numbers else [])
    return f" ({'; '.join(parts)})" if parts else ""
