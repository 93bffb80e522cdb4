"""Time from claim to first training step, through a real API server and a real `gridfleet worker`.

Each job runs in a fresh child process (a trainer crash must never kill the agent), so the overhead is
mostly that process starting and importing torch. Printed beside a bare `python -c "import torch"`
measured in the same run, as a ratio.

    python bench/job_overhead.py [--jobs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fleet import Fleet  # noqa: E402


def import_torch_seconds(repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    grid = {
        "name": "overhead", "trainer": "gated_rnn", "seeds": list(range(args.jobs)),
        "config": {"state_size": 32, "n_layers": 1, "batch_size": 8, "history": 20, "steps": 3, "log_every": 1,
                   "corpus_bytes": 100_000, "checkpoint_every": 1000},
    }
    with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), heartbeat_seconds=1) as fleet:
        fleet.post("/grids", grid)
        fleet.start_worker("w0", "--max-jobs", str(args.jobs))
        fleet.wait_for(lambda: fleet.get("/grids/overhead")["counts"]["succeeded"] == args.jobs, 600, "the jobs")
        overheads = []
        for row in fleet.get("/grids/overhead/results")["results"]:
            job = fleet.get(f"/jobs/{row['job_id']}")
            claimed = job["attempt_history"][0]["started_at"]
            first_step = fleet.get(f"/jobs/{row['job_id']}/metrics")["metrics"][0]["time"]
            overheads.append(first_step - claimed)
    torch_import = import_torch_seconds()
    median = statistics.median(overheads)
    print(f"{'what':<40}{'seconds':>10}")
    print(f"{'claim -> first step, median of ' + str(len(overheads)):<40}{median:>10.2f}")
    print(f"{'claim -> first step, max':<40}{max(overheads):>10.2f}")
    label = 'python -c "import torch" (median of 3)'
    print(f"{label:<40}{torch_import:>10.2f}")
    print(f"ratio claim->first step / import torch: {median / torch_import:.2f}")


if __name__ == "__main__":
    main()
