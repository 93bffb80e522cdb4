"""How many jobs an agent claims as one gang (K), and how many of them fit on a device.

K = min(the agent's `max_gang` setting, the server's `max_gang_jobs`, the jobs left under --max-jobs, what
the last gang measured fits on this device). On a CUDA device the gang's child takes one member's memory
(`member_bytes`: the trainer's own hook, else what an earlier gang of that shape measured, else a dry step,
worker/dry_step.py) and keeps as many members as the free memory (`budget`: no more than the worker's share
of the device) holds, less a reserve; the rest are released and claimed again. On a CPU K is the setting.
docs/gang_claims.md "Packing by memory" says why these numbers.
"""
from __future__ import annotations

from typing import Any

from worker import dry_step  # imports no torch: its CudaMemory does, in a gang's child only

# The agent hands a gang's child what it knows under this key of the first job: {"member_bytes": {cache key:
# bytes}, "gpu_share": its share of the device or None} (worker/gang_run.py -> worker/gang_child.py).
PACKING = "packing"
RESERVE = 0.1  # of the free memory, left for the allocator's fragmentation and the optimizer's first step


def claim_size(setting: int, server_limit: int | None = None, jobs_left: int | None = None,
               device_fit: int | None = None) -> int:
    """K for the next claim; 1 means one job at a time (the solo path)."""
    k = max(1, int(setting))
    for cap in (server_limit, jobs_left, device_fit):
        if cap is not None:
            k = min(k, max(1, int(cap)))
    return k


def fit_on_device(members: int, member_bytes: int, free_bytes: int, reserve: float = RESERVE) -> int:
    """Members of `member_bytes` each that fit into `free_bytes` less the reserve: at least 1 (a single member
    that does not fit fails as it would solo), at most `members`."""
    if member_bytes <= 0:
        return members
    return max(1, min(members, int(free_bytes * (1.0 - reserve)) // int(member_bytes)))


def budget(free_bytes: int, total_bytes: int, share: float | None = None) -> int:
    """Bytes a gang may fill: the device's free memory, and at most the worker's `share` of it (a Ray actor
    of num_gpus=0.25 leaves three quarters to the actors beside it)."""
    if share is None or not 0 < share < 1:
        return free_bytes
    return min(free_bytes, int(total_bytes * share))


def gpu_share(capacity: float | None) -> float | None:
    """The share of one device this worker offers (--gpus / Ray's num_gpus below 1), or None: all of it."""
    return capacity if capacity is not None and 0 < capacity < 1 else None


def member_bytes(fused, cfg: Any, ctx: Any, key: str, known: dict[str, int], memory) -> tuple[int, bool]:
    """One member's bytes on ctx.device, and whether a dry step measured it just now (the agent keeps it, by
    `key`, for its later gangs): the trainer's own `member_bytes(cfg, device)` when it has one (cheaper),
    else what an earlier gang of this key measured, else one member's dry step. Raises DryStepFailed."""
    hook = getattr(fused, "member_bytes", None)
    if hook is not None:
        return int(hook(cfg, ctx.device)), False
    if key in known:
        return int(known[key]), False
    return dry_step.measure(fused.train_many, cfg, ctx, memory), True
