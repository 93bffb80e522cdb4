"""How many jobs an agent claims as one gang (K), and how many of them fit on a device.

K = min(the agent's `max_gang` setting, the server's `max_gang_jobs`, the jobs left under --max-jobs, what
the last gang measured fits on this device). On a CUDA device the gang's child measures one member with a
dry step (a fused trainer's optional `member_bytes(cfg, device)`) and keeps as many members as the free
memory holds, less a reserve; the rest are released and claimed again. On a CPU K is the setting.
docs/gang_claims.md says why these numbers.
"""
from __future__ import annotations

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
