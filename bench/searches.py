"""Searches (docs/searches.md): how good a TPE / CMA-ES search's best is against random search with the same
number of trials, over many seeds, and what asking costs per trial. In-process on a SQLite file (or
--postgres URL): the search loop and the queue are the real ones; a trial is the objective trainer's value,
computed here, so only the search is measured.

    .venv/bin/python bench/searches.py                    # quadratic and branin, 40 trials, 8 seeds
    .venv/bin/python bench/searches.py --seeds 3 --trials 20 --functions quadratic

Prints, per function and sampler, the mean and median best value over seeds, the ratio to random's mean
(below 1: better than random), and the mean milliseconds one advance (tell + ask) took per trial.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.db import make_engine, migrate  # noqa: E402
from scheduler.grids import submit_grid  # noqa: E402
from scheduler.policy import RetryPolicy  # noqa: E402
from scheduler.queue import Queue  # noqa: E402
from scheduler.reports import grid_summary  # noqa: E402
from scheduler.search import Searches  # noqa: E402
from scheduler.spec import GridSpec  # noqa: E402
from worker.trainers import validate_config  # noqa: E402
from worker.trainers.objective import Config, value  # noqa: E402

SPACES = {
    "quadratic": {"x": {"type": "float", "low": -10, "high": 10}, "y": {"type": "float", "low": -10, "high": 10}},
    "branin": {"x": {"type": "float", "low": -5, "high": 10}, "y": {"type": "float", "low": 0, "high": 15}},
}


def run_one(engine, name: str, function: str, sampler: str, seed: int, trials: int, parallel: int):
    """One search to its end, `parallel` trials in flight; returns (best value, seconds spent advancing)."""
    spec = GridSpec(name=name, trainer="objective", config={"function": function},
                    search={"sampler": sampler, "n_trials": trials, "seed": seed, "parallel": parallel,
                            "metric": "loss", "space": SPACES[function]})
    grid_id = submit_grid(engine, spec, validate_config).grid_id
    searches, queue = Searches(engine), Queue(engine, RetryPolicy(lease_seconds=600.0))
    worker = queue.register_worker("bench", "h", ["objective"])
    spent = 0.0
    start = time.perf_counter()
    searches.advance(grid_id)
    spent += time.perf_counter() - start
    while True:
        job = queue.claim(worker, grid_id=grid_id)
        if job is None:
            summary = grid_summary(engine, grid_id)["search"]
            if summary["state"] == "done":
                searches.close()
                return summary["best"]["value"], spent
            start = time.perf_counter()
            searches.advance(grid_id)
            spent += time.perf_counter() - start
            continue
        queue.finish(job.id, job.attempt_id, "succeeded", result={"loss": value(Config(**job.config))},
                     worker_id=worker)
        start = time.perf_counter()
        searches.after_finish([job.id])
        spent += time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--functions", default="quadratic,branin")
    parser.add_argument("--samplers", default="random,tpe,cmaes")
    parser.add_argument("--postgres", default=None, help="a Postgres URL of an empty database (default: SQLite)")
    args = parser.parse_args()
    url = args.postgres or f"sqlite:///{tempfile.mkdtemp(prefix='gf-bench-search-')}/gridfleet.db"
    migrate(url)
    engine = make_engine(url)
    print(f"{args.trials} trials, {args.parallel} in flight, {args.seeds} seeds, "
          f"{'postgres' if args.postgres else 'sqlite'}")
    print(f"{'function':<10} {'sampler':<8} {'mean best':>10} {'median':>10} {'vs random':>10} {'ms/trial':>9}")
    for function in args.functions.split(","):
        means = {}
        for sampler in args.samplers.split(","):
            bests, spent = [], 0.0
            for seed in range(args.seeds):
                best, seconds = run_one(engine, f"{function}-{sampler}-{seed}", function, sampler, seed,
                                        args.trials, args.parallel)
                bests.append(best)
                spent += seconds
            means[sampler] = statistics.mean(bests)
            ratio = means[sampler] / means["random"] if means.get("random") else float("nan")
            print(f"{function:<10} {sampler:<8} {means[sampler]:>10.4f} {statistics.median(bests):>10.4f} "
                  f"{ratio:>10.3f} {1000 * spent / (args.seeds * args.trials):>9.1f}")
    engine.dispose()


if __name__ == "__main__":
    main()
