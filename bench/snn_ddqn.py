"""snn_ddqn (seed 002): env steps per second, spiking vs plain network, and episodes to solve CartPole-v1.

Runs the real trainer in this process with an in-memory context (no queue, no checkpoints written), each
case for a fixed wall time, all cases of a table in the same run so the ratios compare like with like.

1. Throughput: env steps per second (learning included: an update every 4 steps, batch 100) with the
   seed's network (hidden [64, 64], 25 SNN steps, beta 0.95), epsilon held at 0.1 so most steps run a
   forward pass, on LunarLander-v3 and CartPole-v1, 1 and 8 agents, on the CPU and on CUDA when there is
   one. The `snn/ann` column is the SNN's rate over the ANN's in the same row group.
2. Episodes to solve CartPole-v1 (mean return >= 475 over the last 100 episodes) for the ANN and the SNN
   (membrane readout: summed spikes cannot exceed snn_tSteps, far below CartPole's values), each within
   a time and episode budget; "not solved" says how far it got.

    python bench/snn_ddqn.py                      # both parts (about 4 + 2 x --solve-seconds minutes)
    python bench/snn_ddqn.py --part throughput --seconds 10
    python bench/snn_ddqn.py --part solve --solve-seconds 900 --devices cpu
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from worker.trainers import snn_ddqn

SEED_NET = {"hidden_layers": [64, 64], "snn_tSteps": 25, "snn_beta": 0.95, "batch": 100, "update_every": 4,
            "learning_rate": 4e-4, "gamma": 0.995}
# CartPole settings that solve it with a plain net in a few hundred episodes (the seed's tau 0.001 and
# decay 0.998 are tuned for 15,000 LunarLander episodes).
CARTPOLE_SOLVE = {"env_id": "CartPole-v1", "hidden_layers": [64, 64], "learning_rate": 1e-3, "gamma": 0.99,
                  "batch": 64, "buffer_size": 20_000, "update_every": 1, "decay": 0.95, "epsilon_min": 0.01,
                  "tau": 0.005, "stop_at_mean_return": 475.0, "stop_learning_at_win_percent": None,
                  "checkpoint_every": 10 ** 9}


class BenchContext:
    """What train() needs from a TrainerContext, in memory."""

    def __init__(self, device: str, seed: int = 0):
        self.seed, self.device = seed, device
        self.reports: list[tuple[int, dict]] = []

    def report(self, step: int, **metrics: Any) -> None:
        self.reports.append((step, metrics))

    def progress(self, done: float, total: float) -> None:
        pass

    def event(self, kind: str, message: str) -> None:
        print(f"  event {kind}: {message}")

    def save_checkpoint(self, state: dict, step: int | None = None) -> dict:
        return {}

    def load_checkpoint(self) -> None:
        return None

    def should_stop(self) -> bool:
        return False


def run(config: dict, device: str) -> tuple[dict, BenchContext]:
    ctx = BenchContext(device)
    result = snn_ddqn.train(snn_ddqn.Config.model_validate(config), ctx)
    return result, ctx


def throughput(devices: list[str], seconds: float) -> None:
    print(f"\n## env steps per second ({seconds:.0f} s per case; learning included)\n")
    print("| env | agents | device | ann steps/s | snn steps/s | snn/ann |")
    print("|---|---|---|---|---|---|")
    for env_id in ("LunarLander-v3", "CartPole-v1"):
        for agents in (1, 8):
            for device in devices:
                rates = {}
                for arch in ("ann", "snn"):
                    config = {**SEED_NET, "env_id": env_id, "architecture": arch, "agents": agents,
                              "epsilon_start": 0.1, "epsilon_min": 0.1, "episodes": 10 ** 6,
                              "train_max_time": seconds, "stop_learning_at_win_percent": None,
                              "checkpoint_every": 10 ** 9, "device": device}
                    result, _ = run(config, device)
                    rates[arch] = result["env_steps"] / result["seconds"]
                print(f"| {env_id} | {agents} | {device} | {rates['ann']:,.0f} | {rates['snn']:,.0f} | "
                      f"{rates['snn'] / rates['ann']:.3f}x |", flush=True)


def solve(devices: list[str], seconds: float, episodes: int) -> None:
    print(f"\n## episodes to solve CartPole-v1 (mean return >= 475 over 100; at most {episodes} episodes, "
          f"{seconds:.0f} s)\n")
    print("| network | device | solved at episode | best mean return (100) | episodes run | env steps | seconds |")
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        for name, extra in (("ann", {"architecture": "ann"}),
                            ("snn, membrane readout", {"architecture": "snn", "readout": "membrane"})):
            config = {**CARTPOLE_SOLVE, **extra, "episodes": episodes, "train_max_time": seconds, "device": device}
            result, _ = run(config, device)
            solved = result["solved_at_episode"] if result["solved"] else "not solved"
            print(f"| {name} | {device} | {solved} | {result['best_mean_return']:.1f} | {result['episodes']} | "
                  f"{result['env_steps']:,} | {result['seconds']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "solve", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=20.0, help="wall time per throughput case")
    parser.add_argument("--solve-seconds", type=float, default=600.0, help="time budget per solve run")
    parser.add_argument("--solve-episodes", type=int, default=2000)
    parser.add_argument("--devices", default=None, help="comma-separated; default cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny nets: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# snn_ddqn bench: torch {torch.__version__}, {args.threads} thread(s), GPU: {gpu}")
    if args.part in ("throughput", "all"):
        throughput(devices, args.seconds)
    if args.part in ("solve", "all"):
        solve(devices, args.solve_seconds, args.solve_episodes)


if __name__ == "__main__":
    main()
