"""Early stopping (issue 14): seed 001's gated_rnn configs, the full grid vs the same grid with an ASHA rule.

Both runs are real `gridfleet run GRID.yaml --workers N` processes (embedded mode: SQLite, local agents
training in child processes), one after the other in this run, on the same machine and the same settings.
The grid: seed 001's four gate flags (input, forget, output, state; new state and residual on) x `--layers`
(seed 001's n_layers; default 1), 32 units, the seed's Adam lr 1e-3, batch `--batch`, a window longer than the run, `--steps` steps, the
seed's moving-average loss reported every 10 steps; objective min:min_loss (the seed's). The ASHA run adds
`prune: {rule: asha, metric: loss, min_steps, reduction_factor, max_resource: steps}` (`--rule hyperband`:
the same with Optuna's Hyperband brackets; the run is still labelled "asha" in the table).

Printed: jobs succeeded/pruned, steps trained (the sum over jobs of the steps they reached), worker-seconds
(the sum over attempts of their wall time: what a fleet pays for), the wall time, and the best config each
run found with its rank in the full grid by min_loss. Target: >= 3x fewer step-hours, same best config.
Heartbeats every `--heartbeat` s in both runs; a job pruned at a rung stops there (its child waits at each
rung for the verdict of a heartbeat sent at once: docs/early_stopping.md). Also printed: where the
worker-seconds go (each attempt's start, training and end, from its report times).

    python bench/pruning.py                      # 16 configs x 900 steps, 2 workers (about 3 minutes)
    python bench/pruning.py --layers 1,2            # 32 configs (about 7 minutes)
    python bench/pruning.py --steps 600 --workers 1
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate"]


def grid(name: str, args, prune: bool) -> dict:
    spec = {
        "name": name, "trainer": "gated_rnn", "objective": "min:min_loss",
        "config": {"state_size": 32, "use_residual": True, "use_new_state": True,
                   "use_old_state": False, "batch_size": args.batch, "history": args.steps + 1, "steps": args.steps,
                   "lr": 1e-3, "log_every": 10, "checkpoint_every": args.steps, "corpus_bytes": 200_000},
        "axes": {**{flag: [False, True] for flag in FLAGS}, "n_layers": args.layers},
    }
    if prune:
        spec["prune"] = {"rule": args.rule, "metric": "loss", "min_steps": args.min_steps,
                         "reduction_factor": args.eta, "max_resource": args.steps}
    return spec


def run(workdir: Path, spec: dict, args) -> dict:
    workdir.mkdir(parents=True)
    (workdir / "grid.json").write_text(json.dumps(spec))
    env = {**os.environ, "GRIDFLEET_HOME": str(workdir / "home"), "GRIDFLEET_HEARTBEAT_SECONDS": str(args.heartbeat),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    env.pop("DATABASE_URL", None)
    env.pop("GRIDFLEET_SERVER_URL", None)
    began = time.monotonic()
    # --gang 1 by default: a gang's members each hold an attempt over the gang's whole wall time, so summed
    # attempt times would count one process K times.
    done = subprocess.run([sys.executable, "-m", "cli", "run", "grid.json", "--workers", str(args.workers),
                           "--gang", str(args.gang)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - began
    if done.returncode != 0:
        sys.exit(f"gridfleet run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    db = sqlite3.connect(workdir / "home" / "gridfleet.db")
    jobs = []
    for job_id, state, step, config, result, pruned_step in db.execute(
            "SELECT id, state, step, config, result, pruned_step FROM jobs ORDER BY id"):
        config = json.loads(config)
        jobs.append({"id": job_id, "state": state, "step": step or 0, "pruned_step": pruned_step,
                     "key": (*(config[f] for f in FLAGS), config["n_layers"]),
                     "min_loss": (json.loads(result) or {}).get("min_loss") if result else None})
    worker_seconds = db.execute("SELECT SUM(ended_at - started_at) FROM attempts").fetchone()[0]
    # Where an attempt's wall time goes, from the child's own report times: its start (claim -> the first
    # report: fork, set-up, the first log_every steps), training (first -> last report), its end (the last
    # report -> the finish: checkpoint, exit, the last heartbeat, the finish call).
    parts = db.execute("""
        SELECT SUM(first - started_at), SUM(last - first), SUM(ended_at - last), COUNT(*) FROM (
            SELECT a.started_at, a.ended_at, MIN(m.time) AS first, MAX(m.time) AS last
            FROM attempts a JOIN metrics m ON m.attempt_id = a.id GROUP BY a.id)""").fetchone()
    db.close()
    return {"jobs": jobs, "wall": wall, "worker_seconds": worker_seconds,
            "steps": sum(j["step"] for j in jobs), "parts": parts}


def describe(key: tuple) -> str:
    on = [flag.removeprefix("use_").removesuffix("_gate") for flag, value in zip(FLAGS, key) if value]
    return ("+".join(on) or "no gates") + f", {key[-1]} layer(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", type=lambda text: [int(n) for n in text.split(",")], default=[1],
                        help="n_layers values, e.g. 1,2 (32 configs); default 1 (16 configs)")
    parser.add_argument("--min-steps", type=int, default=100)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--heartbeat", type=float, default=0.25)
    parser.add_argument("--rule", choices=["asha", "hyperband"], default="asha",
                        help="the pruned run's rule (hyperband: Optuna's brackets of ASHA; same min_steps, eta)")
    parser.add_argument("--gang", type=int, default=1,
                        help="gridfleet run --gang (default 1: jobs one at a time, so worker-seconds add up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gf-prune-bench-") as tmp:
        full = run(Path(tmp) / "full", grid("full", args, prune=False), args)
        asha = run(Path(tmp) / "asha", grid("asha", args, prune=True), args)
    ranked = sorted((j for j in full["jobs"] if j["min_loss"] is not None), key=lambda j: j["min_loss"])
    rank = {j["key"]: i + 1 for i, j in enumerate(ranked)}
    print(f"{len(full['jobs'])} configs x {args.steps} steps, batch {args.batch}, {args.workers} workers, "
          f"heartbeat {args.heartbeat} s; {args.rule} min_steps {args.min_steps}, eta {args.eta}")
    print(f"{'run':<6} {'succeeded':>9} {'pruned':>6} {'steps':>7} {'worker-s':>9} {'wall s':>7}  best found (rank in full)")
    for name, out in (("full", full), ("asha", asha)):
        done = [j for j in out["jobs"] if j["state"] == "succeeded"]
        best = min(done, key=lambda j: j["min_loss"])
        print(f"{name:<6} {len(done):>9} {sum(j['state'] == 'pruned' for j in out['jobs']):>6} {out['steps']:>7} "
              f"{out['worker_seconds']:>9.1f} {out['wall']:>7.1f}  {describe(best['key'])} "
              f"min_loss {best['min_loss']:.4f} (rank {rank[best['key']]})")
    print("where the worker-seconds go (summed over attempts; per attempt in brackets):")
    for name, out in (("full", full), ("asha", asha)):
        start, train, end, n = out["parts"]
        print(f"  {name:<5} start {start:6.1f} s ({start / n:.2f})  training {train:6.1f} s ({train / n:.2f})  "
              f"end {end:6.1f} s ({end / n:.2f})  [claim -> first report -> last report -> finish]")
    print(f"full/asha: steps {full['steps'] / asha['steps']:.2f}x, worker-seconds "
          f"{full['worker_seconds'] / asha['worker_seconds']:.2f}x, wall {full['wall'] / asha['wall']:.2f}x")
    stopped = sorted((j["pruned_step"] for j in asha["jobs"] if j["state"] == "pruned"))
    print(f"pruned at steps: {stopped}; steps reached by pruned jobs: "
          f"{sorted(j['step'] for j in asha['jobs'] if j['state'] == 'pruned')}")


if __name__ == "__main__":
    main()
