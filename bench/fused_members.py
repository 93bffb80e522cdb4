"""sparse_rnn and snn_ddqn gangs: K members fused by `train_many` vs the same K configs run solo, one after
another, measured side by side in one process (issue 12).

Each case trains K configs that differ in seed and lr (one fuse key) both ways, alternating the two ways
over `--rounds` rounds so a load spike on a shared machine falls on both, and prints the best time of each
and solo/fused (> 1: fusing is faster). It also checks that every member's result equals its solo run's
(sparse_rnn: final and test loss to 1e-4; snn_ddqn: the same returns), so the speed is of the same work.

- sparse_rnn: seed 000's block model on RandomAnomaly files in the real parquet layout (random images,
  `--image` pixels a side, written to a temporary folder first: the offline task draws its images lazily,
  which would time the image transforms, not the model), hidden `--hidden`, R=`--density` blocks, batch 16
  as the seed, dense and sparse representation; each twice: every job reading its files (a gang reads them
  once: the same files for every seed), and the data in memory for both ways (the training alone).
- snn_ddqn: seed 002's spiking net ([64, 64], 25 time steps, batch 100) on CartPole-v1, one agent per job,
  epsilon from 0.3 so most actions need the network, an update every 4 env steps.

    python bench/fused_members.py                          # both trainers, K = 8 (about 3 minutes on 2 cores)
    python bench/fused_members.py --trainer snn_ddqn --members 4 --episodes 10
    python bench/fused_members.py --device cuda
"""
from __future__ import annotations

import argparse
import itertools
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from bench.memory_context import MemoryContext
from worker.trainers import snn_ddqn, snn_fused, sparse_fused, sparse_rnn

LRS = [1e-3, 3e-3, 2e-3, 5e-3, 4e-3, 1.5e-3, 2.5e-3, 6e-3]


def write_random_anomaly(folder: Path, rows: int, side: int) -> None:
    """RandomAnomaly_{Train,Validate,Test} parquet files as the seed's: x [rows, 11, side^2], y 11 labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for stem, n in (("RandomAnomaly_Train", rows), ("RandomAnomaly_Validate", 16), ("RandomAnomaly_Test", 16)):
        x = rng.random((n, 11, side * side), dtype=np.float32)
        frames = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), side * side)
        column = pa.FixedSizeListArray.from_arrays(frames, 11)
        anomaly = rng.integers(10, size=n)
        labels = [[int(k == a) for k in range(10)] + [int(a)] for a in anomaly]
        pq.write_table(pa.table({"x": column, "y": labels}), folder / f"{stem}.parquet")


def sparse_configs(k: int, args, representation: str) -> list[sparse_rnn.Config]:
    base = {"hidden_size": args.hidden, "density": args.density, "representation": representation,
            "max_steps": args.steps, "max_epochs": 1000, "log_every": 10, "checkpoint_every": 10 ** 9,
            "data": {"dataset": "random_anomaly", "path": args.folder, "train_size": 16 * args.steps,
                     "validation_size": 16, "test_size": 16, "batch_size": 16}}
    return [sparse_rnn.Config.model_validate({**base, "learning_rate": LRS[i % len(LRS)]}) for i in range(k)]


def snn_configs(k: int, args) -> list[snn_ddqn.Config]:
    base = {"env_id": "CartPole-v1", "episodes": args.episodes, "hidden_layers": [64, 64], "snn_tSteps": 25,
            "batch": 100, "buffer_size": 10_000, "update_every": 4, "epsilon_start": 0.3, "decay": 0.95,
            "gamma": 0.99, "tau": 0.005, "checkpoint_every": 10 ** 6, "stop_learning_at_win_percent": None}
    return [snn_ddqn.Config.model_validate({**base, "learning_rate": LRS[i % len(LRS)]}) for i in range(k)]


def cached(load):
    """sparse_rnn.load_data read once per (data section, seed), for both ways alike."""
    seen: dict = {}

    def load_data(cfg, seed):
        key = (cfg.data.model_dump_json(), seed)
        if key not in seen:
            seen[key] = load(cfg, seed)
        return seen[key]

    return load_data


def timed(run) -> tuple[float, list]:
    began = time.perf_counter()
    results = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began, results


def compare(name: str, module, fused_module, cfgs: list, device: str, rounds: int, same) -> float:
    seeds = list(range(len(cfgs)))
    solo = lambda: [module.train(c, MemoryContext(device, s)) for c, s in zip(cfgs, seeds)]  # noqa: E731
    fused = lambda: fused_module.train_many(cfgs, [MemoryContext(device, s) for s in seeds])  # noqa: E731
    best_solo = best_fused = math.inf
    for _ in range(rounds):
        t_solo, solo_results = timed(solo)
        t_fused, fused_results = timed(fused)
        best_solo, best_fused = min(best_solo, t_solo), min(best_fused, t_fused)
    failed = [r for r in fused_results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{name}: fused members failed: {failed[:2]}")
    agree = all(same(a, b) for a, b in zip(solo_results, fused_results))
    print(f"{name:<60} {len(cfgs):>3} {best_solo:>9.2f} {best_fused:>9.2f} {best_solo / best_fused:>9.2f}x"
          f"  {'equal' if agree else 'DIFFERENT'}")
    return best_solo / best_fused


def same_sparse(a: dict, b: dict) -> bool:
    return all(math.isclose(a[k], b[k], rel_tol=1e-4) for k in ("final_loss", "test_loss"))


def same_snn(a: dict, b: dict) -> bool:
    return a["return_curve"] == b["return_curve"] and a["env_steps"] == b["env_steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["sparse_rnn", "snn_ddqn", "both"], default="both")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="sparse_rnn: optimizer steps per member")
    parser.add_argument("--image", type=int, default=20, help="sparse_rnn: image side (input size = side^2)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--episodes", type=int, default=15, help="snn_ddqn: episodes per member")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.threads} torch thread(s), best of {args.rounds} alternating rounds")
    print(f"{'case':<60} {'K':>3} {'solo s':>9} {'fused s':>9} {'solo/fused':>10}")
    if args.trainer in ("sparse_rnn", "both"):
        folder = Path(tempfile.mkdtemp(prefix="gf_fused_members_"))
        try:
            write_random_anomaly(folder, 16 * args.steps, args.image)
            args.folder = str(folder)
            read_files = sparse_rnn.load_data
            for rep, in_memory in itertools.product(("dense", "sparse"), (False, True)):
                # in memory: both ways get the data from one cache, so only the training is timed
                sparse_rnn.load_data = cached(read_files) if in_memory else read_files
                name = (f"sparse_rnn {rep} x{args.image ** 2} h{args.hidden} R={args.density} {args.steps} steps"
                        f"{', data in memory' if in_memory else ''}")
                warm = sparse_configs(2, argparse.Namespace(**{**vars(args), "steps": 2}), rep)
                compare("(warm-up)", sparse_rnn, sparse_fused, warm, args.device, 1, same_sparse)
                compare(name, sparse_rnn, sparse_fused, sparse_configs(args.members, args, rep), args.device,
                        args.rounds, same_sparse)
            sparse_rnn.load_data = read_files
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.trainer in ("snn_ddqn", "both"):
        name = f"snn_ddqn CartPole [64,64] T25 {args.episodes} episodes"
        compare(name, snn_ddqn, snn_fused, snn_configs(args.members, args), args.device, args.rounds, same_snn)


if __name__ == "__main__":
    main()
