"""kill -9 a worker mid-job: how much work is lost, and how long until training resumes elsewhere.

A real API server, two real `gridfleet worker` processes and a gated-RNN job that checkpoints every
`--checkpoint-every` steps. The worker holding the job is killed (its whole process group, child
included); the other one re-claims the job when the lease expires and resumes from the checkpoint.
Targets (issue 3): steps lost <= one checkpoint interval; kill -> resumed <= lease + 5 s.

    python bench/recovery.py [--lease 6] [--checkpoint-every 50]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fleet import Fleet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease", type=float, default=6.0)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--kill-after-steps", type=int, default=120)
    args = parser.parse_args()
    grid = {
        "name": "recovery", "trainer": "gated_rnn",
        "config": {"state_size": 256, "n_layers": 2, "batch_size": 64, "history": 200, "steps": 100_000,
                   "log_every": 1, "corpus_bytes": 100_000, "checkpoint_every": args.checkpoint_every},
    }
    with tempfile.TemporaryDirectory() as tmp, \
            Fleet(Path(tmp), lease_seconds=args.lease, heartbeat_seconds=1) as fleet:
        fleet.post("/grids", grid)
        job_id = fleet.get("/grids/recovery/results")["results"][0]["job_id"]
        workers = {name: fleet.start_worker(name) for name in ("a", "b")}

        def step_of_first_attempt():
            job = fleet.get(f"/jobs/{job_id}")
            return job if job["state"] == "running" and (job["step"] or 0) >= args.kill_after_steps else None

        job = fleet.wait_for(step_of_first_attempt, 300, f"job {job_id} to reach step {args.kill_after_steps}")
        holder = next(w["name"] for w in fleet.get("/workers")["workers"] if w["id"] == job["worker_id"])
        first_attempt = job["attempt_id"]
        fleet.kill_hard(workers[holder])
        killed_at = time.time()
        survivor = "b" if holder == "a" else "a"

        def resumed_metrics():
            metrics = fleet.get(f"/jobs/{job_id}/metrics")["metrics"]
            later = [m for m in metrics if m["attempt_id"] != first_attempt]
            return (metrics, later) if later else None

        metrics, later = fleet.wait_for(resumed_metrics, args.lease + 120, "the job to resume")
        seconds = later[0]["time"] - killed_at
    # Metrics travel in heartbeats, so the last second before the kill never arrived; extrapolate the
    # first attempt's steady rate to the kill to know how far it had trained.
    before = [m for m in metrics if m["attempt_id"] == first_attempt]
    recent = before[len(before) // 2:]
    rate = (recent[-1]["step"] - recent[0]["step"]) / (recent[-1]["time"] - recent[0]["time"])
    trained = recent[-1]["step"] + rate * (killed_at - recent[-1]["time"])
    resumed_from = later[0]["step"] - 1  # the new attempt's first trained step is resumed_from + 1
    lost = trained - resumed_from
    print(f"killed worker '{holder}' at about step {trained:.0f} ({rate:.0f} steps/s); "
          f"'{survivor}' resumed from step {resumed_from}")
    print(f"{'measure':<34}{'measured':>10}{'target':>10}{'ratio':>8}")
    print(f"{'steps lost (trained, not saved)':<34}{lost:>10.0f}{args.checkpoint_every:>10}"
          f"{lost / args.checkpoint_every:>8.2f}")
    target = args.lease + 5
    print(f"{'kill -> resumed training (s)':<34}{seconds:>10.1f}{target:>10.1f}{seconds / target:>8.2f}")


if __name__ == "__main__":
    main()
