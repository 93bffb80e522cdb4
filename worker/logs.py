"""A worker's log: one line per job event (claimed, finished, preempted, ...) from worker/agent.py, and no
line per HTTP request: httpx logs every request at INFO, several a second per worker with heartbeats."""
from __future__ import annotations

import logging

QUIET = ("httpx", "httpcore")  # their warnings still show


def configure(level: int = logging.INFO, **basic) -> None:
    logging.basicConfig(level=level, format=basic.pop("format", "%(asctime)s %(name)s %(message)s"), **basic)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
