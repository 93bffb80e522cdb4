"""PgQueuer's batched consumer on the same Postgres, for bench/gang_throughput.py to put beside gang claims.

PgQueuer is an optional bench dependency (`pip install pgqueuer`, the `bench` extra), never the product's.
`measure(url, jobs, batch_size)` installs PgQueuer's tables in the given (fresh) database, enqueues `jobs`
no-op jobs, and times one QueueManager draining them with `batch_size` jobs per dequeue: jobs/s from the
start of the run to the queue being empty (its per-job status log and heartbeats included, as it runs).
"""
from __future__ import annotations

import asyncio
import importlib.util
import time

ENQUEUE_CHUNK = 5_000


def available() -> bool:
    return importlib.util.find_spec("pgqueuer") is not None


def measure(url: str, jobs: int, batch_size: int) -> float:
    return asyncio.run(_measure(url, jobs, batch_size))


async def _measure(url: str, jobs: int, batch_size: int) -> float:
    import psycopg
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as setup:
        queries = Queries(PsycopgDriver(setup))
        await queries.install()
        for start in range(0, jobs, ENQUEUE_CHUNK):
            count = min(ENQUEUE_CHUNK, jobs - start)
            await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
    done = 0
    connection = await psycopg.AsyncConnection.connect(url, autocommit=True)
    manager = QueueManager(Queries(PsycopgDriver(connection)))

    @manager.entrypoint("noop")
    async def noop(_job) -> None:
        nonlocal done
        done += 1

    started = time.perf_counter()
    await manager.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
    elapsed = time.perf_counter() - started
    if done != jobs:
        raise RuntimeError(f"PgQueuer ran {done} of {jobs} jobs")
    return jobs / elapsed
