"""Claim -> first training step, warm starts against cold ones, through a real API server and real workers.

A warm worker forks each job's child from a process that has torch and the trainers imported
(worker/warm.py); a cold one (`--cold-starts`) spawns each child, which imports them anew. Both run the
same tiny gated_rnn grid, one after the other in this run (rounds alternate), and a bare
`python -c "import torch"` is measured beside them. The corpus is a file, not gated_rnn's default
`stdlib` (which walks the standard library's sources, about 0.8 s of every job's own set-up here). Printed: medians, the ratio cold/warm, and warm
against the issue's target of 0.3 s.

    python bench/job_overhead.py [--jobs 8] [--rounds 1]
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

TARGET_WARM_SECONDS = 0.3
CONFIG = {"state_size": 32, "n_layers": 1, "batch_size": 8, "history": 20, "steps": 3, "log_every": 1,
          "corpus_bytes": 100_000, "checkpoint_every": 1000}


def import_torch_seconds(repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def claim_to_first_step(fleet: Fleet, mode: str, jobs: int, round_: int, corpus: Path) -> list[float]:
    """Seconds from each job's claim (its attempt's start) to its first reported step, for one worker."""
    name = f"overhead-{mode}-{round_}"
    fleet.post("/grids", {"name": name, "trainer": "gated_rnn", "seeds": list(range(jobs)),
                          "config": {**CONFIG, "corpus": str(corpus)}})
    worker = fleet.start_worker(f"{mode}-{round_}", f"--{mode}-starts", "--max-jobs", str(jobs))
    fleet.wait_for(lambda: fleet.get(f"/grids/{name}")["counts"]["succeeded"] == jobs, 600, f"the {mode} jobs")
    worker.wait(60)
    seconds = []
    for row in fleet.get(f"/grids/{name}/results")["results"]:
        claimed = fleet.get(f"/jobs/{row['job_id']}")["attempt_history"][0]["started_at"]
        first_step = fleet.get(f"/jobs/{row['job_id']}/metrics")["metrics"][0]["time"]
        seconds.append(first_step - claimed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs per worker and round")
    parser.add_argument("--rounds", type=int, default=1, help="cold then warm, this many times")
    args = parser.parse_args()
    measured: dict[str, list[float]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), heartbeat_seconds=1) as fleet:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_bytes(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))[:100_000])
        for round_ in range(args.rounds):
            for mode in ("cold", "warm"):
                measured[mode] += claim_to_first_step(fleet, mode, args.jobs, round_, corpus)
    torch_import = import_torch_seconds()
    print(f"{'claim -> first step (gated_rnn, ' + str(args.jobs * args.rounds) + ' jobs each)':<46}"
          f"{'median s':>10}{'max s':>10}")
    for mode, values in measured.items():
        print(f"{mode + (' (spawn, imports torch)' if mode == 'cold' else ' (forked from warm process)'):<46}"
              f"{statistics.median(values):>10.3f}{max(values):>10.3f}")
    label = 'python -c "import torch" (median of 3)'
    print(f"{label:<46}{torch_import:>10.3f}")
    cold, warm = statistics.median(measured["cold"]), statistics.median(measured["warm"])
    print(f"ratio cold / warm: {cold / warm:.1f}x")
    print(f"warm / target {TARGET_WARM_SECONDS} s: {warm / TARGET_WARM_SECONDS:.2f} (under 1.00 meets it)")
    print(f"ratio cold / import torch: {cold / torch_import:.2f}")


if __name__ == "__main__":
    main()
