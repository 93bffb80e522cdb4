"""An API outage of twice the lease during a running job: how much training it costs, before and after.

A real API server (SQLite), two real `gridfleet worker` processes, one `sleep` job that reports every step
and checkpoints every `--checkpoint-every` steps. Once the job has checkpointed, the API is killed
(SIGKILL) for 2 x lease, and meanwhile the job's expired lease is requeued as lost, as any claim's expiry
scan does (the claim of any worker, even one that cannot run the job, gets there before the running
worker's heartbeat often enough: here it always does). Then the API starts again on the same port and
database. Each variant (the code at `--before`, and this checkout) runs the same scenario, back to back.

Training lost = the first attempt's wall time from the checkpoint the next attempt resumed from to the
kill of its job process (steps: that times the step rate); 0 when the same attempt finished the job.

    python bench/api_outage.py [--lease 4] [--checkpoint-every 60] [--before ba707d4]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fleet import ROOT, Fleet, export_rev, job_children  # noqa: E402


def run(root: Path, args) -> dict:
    steps, seconds = args.steps, args.steps * args.step_seconds
    grid = {"name": "outage", "trainer": "sleep",
            "config": {"steps": steps, "seconds": seconds, "checkpoint_every": args.checkpoint_every}}
    with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), root=root, lease_seconds=args.lease,
                                                      heartbeat_seconds=0.5, backoff_base_seconds=0.2) as fleet:
        fleet.post("/grids", grid)
        job_id = fleet.get("/grids/outage/results")["results"][0]["job_id"]
        first = fleet.start_worker("a")

        def checkpointed():
            job = fleet.get(f"/jobs/{job_id}")
            return job if job["state"] == "running" and (job["checkpoint"] or {}).get("step") else None

        job = fleet.wait_for(checkpointed, 120, "the job to checkpoint")
        fleet.start_worker("b")
        fleet.wait_for(lambda: len(fleet.get("/workers")["workers"]) == 2, 60, "worker b to register")
        attempt, [child] = job["attempt_id"], job_children(first.pid)
        fleet.kill_server()
        down = time.time()
        requeue_expired(fleet.env["DATABASE_URL"], args.lease)
        time.sleep(max(0.0, down + 2 * args.lease - time.time()))
        fleet.start_server()
        killed_at = None
        while (job := fleet.get(f"/jobs/{job_id}"))["state"] in ("queued", "running"):
            if killed_at is None and child not in job_children(first.pid):
                killed_at = time.time()
            if time.time() > down + 600:
                raise TimeoutError("the job did not finish within 10 minutes")
            time.sleep(0.1)
        metrics = fleet.get(f"/jobs/{job_id}/metrics")["metrics"]
    return measure(job, attempt, metrics, killed_at, args)


def requeue_expired(database_url: str, lease: float) -> None:
    """What any claim's expiry scan does once the lease is over (this checkout's Queue; same in both)."""
    from common.db import make_engine
    from scheduler.policy import RetryPolicy
    from scheduler.queue import Queue

    engine = make_engine(database_url)
    queue = Queue(engine, RetryPolicy(lease_seconds=lease))
    try:
        deadline = time.monotonic() + 5 * lease
        while queue.requeue_expired() == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("the lease did not expire")
            time.sleep(0.1)
    finally:
        queue.close()
        engine.dispose()


def measure(job: dict, attempt: str, metrics: list[dict], killed_at: float | None, args) -> dict:
    outcomes = [a["outcome"] for a in job["attempt_history"]]
    mine = [m for m in metrics if m["attempt_id"] == attempt]
    later = [m for m in metrics if m["attempt_id"] != attempt]
    out = {"state": job["state"], "attempts": " ".join(outcomes), "lost_s": 0.0, "lost_steps": 0.0}
    if job["state"] != "succeeded":  # all of it was lost (e.g. the pointed-to checkpoint had been pruned)
        out["lost_s"] = (killed_at or mine[-1]["time"]) - mine[0]["time"]
        out["lost_steps"] = out["lost_s"] / args.step_seconds
        return out
    if not later:  # the first attempt finished the job: every step once
        assert [m["step"] for m in mine] == list(range(1, args.steps + 1)), "steps missing or repeated"
        return out
    resumed_from = later[0]["step"] - 1
    at_checkpoint = next((m["time"] for m in mine if m["step"] == resumed_from), mine[0]["time"])
    out["lost_s"] = (killed_at or at_checkpoint) - at_checkpoint
    out["lost_steps"] = out["lost_s"] / args.step_seconds
    out["resumed_from"] = resumed_from
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--step-seconds", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=60)
    parser.add_argument("--before", default="ba707d4", help="git commit of the code before the change")
    args = parser.parse_args()
    interval = args.checkpoint_every * args.step_seconds
    with tempfile.TemporaryDirectory() as tmp:
        before = export_rev(args.before, Path(tmp) / "before")
        results = {f"before ({args.before})": run(before, args), "after (this checkout)": run(ROOT, args)}
    print(f"outage {2 * args.lease:.0f} s (2 x lease {args.lease:.0f} s); checkpoint every {args.checkpoint_every} "
          f"steps ({interval:.1f} s); {args.steps} steps of {args.step_seconds} s")
    print(f"{'code':<24}{'job':>11}  {'attempts':<28}{'lost s':>8}{'lost steps':>12}{'/ interval':>12}")
    for name, r in results.items():
        print(f"{name:<24}{r['state']:>11}  {r['attempts']:<28}{r['lost_s']:>8.1f}{r['lost_steps']:>12.0f}"
              f"{r['lost_s'] / interval:>12.2f}")
    lost = [r["lost_s"] for r in results.values()]
    print(f"training lost after / before: {lost[1] / lost[0]:.2f}" if lost[0] else "nothing lost before either")


if __name__ == "__main__":
    main()
