"""A grid through the whole agent, gangs against one job at a time, in the same run.

`gridfleet run GRID --workers W --gang K` (K = the grid's size: one gang per worker; claims, one child per
gang, per-member heartbeats, checkpoints and finishes included) beside `--gang 1` (today's one child per
job), on the same gated_rnn configs (seed 001's gate-flag combos at one shape, as bench/fused.py) and a file
corpus. Printed: wall time of the command (start-up, the warm process's imports, results and plots
included) and the time from the first claim to the last finish (the attempts table), alternating the two,
median of `--rounds`. The
ratio shows what the agent's gang path keeps of fused training's speed-up (bench/fused.py measures the
trainer alone); at the seed's batch of 256 on a CPU fusing does not pay (see bench/README.md), at a small
batch it does.

    python bench/gang_agent.py [--configs 16] [--state 32] [--batch 16] [--steps 200] [--workers 1] [--rounds 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fleet import GRIDFLEET, ROOT  # noqa: E402
from bench.fused import seed_flag_combos  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. to be or not to be. "


def grid(configs: int, state: int, batch: int, steps: int, corpus: Path) -> dict:
    combos = seed_flag_combos(residual_only=state == 32)[:configs]
    keys = sorted(combos[0])
    return {"name": "gang-agent", "trainer": "gated_rnn",
            "config": {"state_size": state, "n_layers": 2, "batch_size": batch, "history": 50, "steps": steps,
                       "corpus": str(corpus), "log_every": 50, "checkpoint_every": steps},
            "zip": {k: [c[k] for c in combos] for k in keys}}


def run_seconds(spec: dict, workers: int, gang: int) -> tuple[float, float]:
    """(wall time of the command, first claim -> last finish from the attempts table)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.json"
        path.write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_") and k != "DATABASE_URL"}
        env.update(PYTHONPATH=str(ROOT), GRIDFLEET_HOME=str(Path(tmp) / ".gridfleet"), COLUMNS="100",
                   OMP_NUM_THREADS="1")  # one torch thread per worker, as the seed's two processes
        began = time.perf_counter()
        subprocess.run([*GRIDFLEET, "run", str(path), "--workers", str(workers), "--gang", str(gang)], cwd=tmp,
                       env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        with sqlite3.connect(Path(tmp) / ".gridfleet" / "gridfleet.db") as db:
            first, last = db.execute("SELECT min(started_at), max(ended_at) FROM attempts").fetchone()
        return wall, last - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--state", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(TEXT * 2000)
        spec = grid(args.configs, args.state, args.batch, args.steps, corpus)
        gang = -(-args.configs // args.workers)
        times: dict[str, list[tuple[float, float]]] = {"gangs": [], "one at a time": []}
        for _ in range(args.rounds):
            times["gangs"].append(run_seconds(spec, args.workers, gang))
            times["one at a time"].append(run_seconds(spec, args.workers, 1))
    print(f"{args.configs} gated_rnn configs, state {args.state}, batch {args.batch}, {args.steps} steps, "
          f"gridfleet run --workers {args.workers} (median of {args.rounds})")
    print(f"{'':<14}{'wall s':>8}{'claim->last finish s':>22}")
    medians = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in times.items()}
    for label, key in ((f"--gang {gang}", "gangs"), ("--gang 1", "one at a time")):
        print(f"{label:<14}{medians[key][0]:>8.1f}{medians[key][1]:>22.1f}")
    print(f"one at a time / gangs: {medians['one at a time'][1] / medians['gangs'][1]:.2f}x claim->last finish, "
          f"{medians['one at a time'][0] / medians['gangs'][0]:.2f}x wall")

if __name__ == "__main__":
    main()
