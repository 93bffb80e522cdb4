"""Claim -> first training step, warm starts against cold ones, through a real API server and real workers.

A warm worker forks each job's child from a process that has torch and the trainers imported
(worker/warm.py); a cold one (`--cold-starts`) spawns each child, which imports them anew. Both run the
same tiny gated_rnn grid, one after the other in this run (rounds alternate), and a bare
`python -c "import torch"` is measured beside them. The corpus is a file, not gated_rnn's default
`stdlib` (which walks the standard library's sources, about 0.8 s of every job's own set-up here). Printed: medians, the ratio cold/warm, and warm
against the issue's target of 0.3 s.

Then (`--run-jobs`, default 40 for a quick check; the issue's size is 200) many one-second jobs through
`gridfleet run --workers 2`, wall time from the command's start to its end (submit, workers, warm
processes, results and plots included), beside two bare loops doing the same sleeps in parallel (the
issue's target: within 1.05x), and Ray Tune running the same trials: a function trainable sleeping one
second, one grid_search trial per job, `max_concurrent_trials` = the workers, on a local
`ray.init(num_cpus=workers)`, wall time of its whole script (ray.init and shutdown included) and of
`Tuner.fit` alone. Each of the three runs in its own process, one after the other.

    python bench/job_overhead.py [--jobs 8] [--rounds 1] [--run-jobs 40] [--run-workers 2] [--no-tune]
    python bench/job_overhead.py --jobs 0 --run-jobs 200      # the second part alone, at the issue's size
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.fleet import GRIDFLEET, ROOT, Fleet  # noqa: E402

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


def _log_times(log: Path, word: str) -> list[float]:
    """Epoch seconds of the worker log's "job N attempt M (sleep) started" or "job N finished: ..." lines."""
    pattern = re.compile(r"(\S+ \S+) job \d+ " + (r"attempt \d+ \(\w+\) started" if word == "started" else "finished:"))
    return [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in map(pattern.match, log.read_text().splitlines()) if m]


def where_it_went(began: float, ended: float, logs: list[Path], seconds: float) -> dict[str, float]:
    """From the agents' logs: the command's start to the first job's start, each job's time beyond its
    sleep (claim, fork, finish: from one job's start to the next one's on the same agent), and the last
    job's end to the command's end; `uneven` is how much later the last agent ended than the first."""
    starts = [_log_times(log, "started") for log in logs]
    ends = [_log_times(log, "finished:") for log in logs]
    per_job = [(b[-1] - b[0]) / (len(b) - 1) - seconds for b in starts if len(b) > 1]
    last = [e[-1] for e in ends if e]
    return {"startup": min(b[0] for b in starts if b) - began, "per_job": statistics.mean(per_job),
            "jobs_per_agent": max(len(e) for e in ends), "uneven": max(last) - min(last), "tail": ended - max(last)}


def gridfleet_run_seconds(jobs: int, workers: int, seconds: float) -> tuple[float, dict[str, float]]:
    """Wall time of `gridfleet run` for `jobs` sleep jobs of `seconds` each, in a fresh directory, and
    where the time beyond the sleeps went (`where_it_went`)."""
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid.json"
        grid.write_text(json.dumps({"name": "overhead-run", "trainer": "sleep", "seeds": list(range(jobs)),
                                    "config": {"seconds": seconds, "steps": 1, "checkpoint_every": 1000}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_") and k != "DATABASE_URL"}
        env.update(PYTHONPATH=str(ROOT), GRIDFLEET_HOME=str(Path(tmp) / ".gridfleet"), COLUMNS="100")
        began, wall = time.perf_counter(), time.time()
        subprocess.run([*GRIDFLEET, "run", str(grid), "--workers", str(workers)], cwd=tmp, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - began
        logs = sorted((Path(tmp) / ".gridfleet" / "runs" / "overhead-run").glob("worker-*.log"))
        return elapsed, where_it_went(wall, wall + elapsed, logs, seconds)


TUNE_SCRIPT = """
import os, sys, tempfile, time
began = time.perf_counter()
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
from ray import tune
trials, workers, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])

def trainable(config):
    time.sleep(seconds)
    tune.report({"loss": 1.0})

ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
fit_began = time.perf_counter()
with tempfile.TemporaryDirectory() as storage:
    tuner = tune.Tuner(trainable, param_space={"seed": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=workers),
                       run_config=tune.RunConfig(storage_path=storage, verbose=0))
    results = tuner.fit()
fit = time.perf_counter() - fit_began
ray.shutdown()
print("TUNE", len(results), results.num_errors, fit, time.perf_counter() - began)
"""


def tune_seconds(jobs: int, workers: int, seconds: float) -> tuple[float, float] | None:
    """(whole script, Tuner.fit alone) for `jobs` one-second trials on a local Ray; None without ray[tune]."""
    if importlib.util.find_spec("ray") is None:  # not importing it here: Ray runs in its own process
        return None
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "tune_trials.py"
        script.write_text(TUNE_SCRIPT)
        done = subprocess.run([sys.executable, str(script), str(jobs), str(workers), str(seconds)], cwd=tmp,
                              check=True, capture_output=True, text=True)
    _, trials, errors, fit, whole = next(line for line in done.stdout.splitlines() if line.startswith("TUNE")).split()
    if int(trials) != jobs or int(errors):
        raise RuntimeError(f"Ray Tune ran {trials} trials with {errors} errors, not {jobs}")
    return float(whole), float(fit)


def bare_loops_seconds(jobs: int, workers: int, seconds: float) -> float:
    """`workers` Python processes sleeping `seconds` per job, sharing `jobs` as the workers would."""
    shares = [jobs // workers + (i < jobs % workers) for i in range(workers)]
    began = time.perf_counter()
    loops = [subprocess.Popen([sys.executable, "-c", f"import time\nfor _ in range({n}): time.sleep({seconds})"])
             for n in shares]
    for loop in loops:
        loop.wait()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="jobs per worker and round")
    parser.add_argument("--rounds", type=int, default=1, help="cold then warm, this many times")
    parser.add_argument("--run-jobs", type=int, default=40,
                        help="one-second jobs through gridfleet run (the issue's size: 200; 0: skip)")
    parser.add_argument("--run-workers", type=int, default=2)
    parser.add_argument("--no-tune", action="store_true", help="skip Ray Tune's run of the same trials")
    args = parser.parse_args()
    if args.jobs:
        claim_part(args)
    if args.run_jobs:
        run_part(args)


def claim_part(args) -> None:
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


def run_part(args) -> None:
    jobs, workers = args.run_jobs, args.run_workers
    load = os.getloadavg()[0]
    bare = bare_loops_seconds(jobs, workers, 1.0)
    run, went = gridfleet_run_seconds(jobs, workers, 1.0)
    tune = None if args.no_tune else tune_seconds(jobs, workers, 1.0)
    print(f"\n{jobs} one-second jobs, {workers} workers (load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end){'seconds':>10}")
    print(f"{'bare loops (time.sleep)':<46}{bare:>10.1f}")
    print(f"{'gridfleet run --workers ' + str(workers):<46}{run:>10.1f}")
    if tune is not None:
        print(f"{'Ray Tune, whole script (init, fit, shutdown)':<46}{tune[0]:>10.1f}")
        print(f"{'Ray Tune, Tuner.fit alone':<46}{tune[1]:>10.1f}")
    print(f"ratio gridfleet run / bare loops: {run / bare:.3f} (target 1.05)")
    print(f"where gridfleet run's {run - bare:.1f} s beyond the bare loops went: {went['startup']:.2f} s from the "
          f"command's start to the first job's, {went['per_job'] * 1000:.0f} ms per job beyond its sleep "
          f"(x {went['jobs_per_agent']} jobs on the busiest agent: {went['per_job'] * went['jobs_per_agent']:.1f} s), "
          f"{went['uneven']:.2f} s between the agents' last jobs, {went['tail']:.2f} s from the last job's end "
          f"to the command's end")
    if tune is not None:
        print(f"ratio Ray Tune / bare loops: {tune[0] / bare:.3f} (fit alone {tune[1] / bare:.3f}); "
              f"Ray Tune / gridfleet run: {tune[0] / run:.2f}x")
    elif not args.no_tune:
        print("Ray Tune: not measured (ray[tune] is not installed here; it is the `bench` extra)")


if __name__ == "__main__":
    main()
