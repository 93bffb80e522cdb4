"""snn_ddqn (seed 002): env steps per second, spiking vs plain network, and episodes to solve CartPole-v1.

Runs the real trainer in this process with an in-memory context (no queue, no checkpoints written), each
case for a fixed wall time, all cases of a table in the same run so the ratios compare like with like.

1. Throughput: env steps per second (learning included: an update every 4 steps, batch 100) with the
   seed's network (hidden [64, 64], 25 SNN steps, beta 0.95), epsilon held at 0.1 so most steps run a
   forward pass, on LunarLander-v3 and CartPole-v1, 1 and 8 agents, on the CPU and on CUDA when there is
   one. Three networks side by side: the ANN, the SNN through snntorch's Leaky step by step (the old path,
   `snn_kernel: snntorch`) and the SNN through the fused forward (spiking/lif.py, the default).
   `fused/snntorch` is the speed-up (target: >= 5x); `fused/ann` what a spiking net still costs.
2. Episodes to solve CartPole-v1 (mean return >= --solve-at, 195 by default, over the last 100 episodes)
   for the ANN and the SNN with both readouts, each within a time and episode budget; "not solved" says
   how far it got. Summed spikes cannot exceed snn_tSteps (25), far below CartPole's discounted returns,
   so the membrane readout is the one expected to solve it.

    python bench/snn_ddqn.py                      # both parts (about 4 + 3 x --solve-seconds minutes)
    python bench/snn_ddqn.py --part throughput --seconds 10
    python bench/snn_ddqn.py --part solve --solve-seconds 600 --devices cpu
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.memory_context import MemoryContext
from worker.trainers import snn_ddqn

SEED_NET = {"hidden_layers": [64, 64], "snn_tSteps": 25, "snn_beta": 0.95, "batch": 100, "update_every": 4,
            "learning_rate": 4e-4, "gamma": 0.995}
# CartPole settings that solve it with a plain net in a few hundred episodes (the seed's tau 0.001 and
# decay 0.998 are tuned for 15,000 LunarLander episodes).
CARTPOLE_SOLVE = {"env_id": "CartPole-v1", "hidden_layers": [64, 64], "learning_rate": 1e-3, "gamma": 0.99,
                  "batch": 64, "buffer_size": 20_000, "update_every": 1, "decay": 0.95, "epsilon_min": 0.01,
                  "tau": 0.005, "stop_learning_at_win_percent": None,
                  "checkpoint_every": 10 ** 9}


def run(config: dict, device: str) -> tuple[dict, MemoryContext]:
    ctx = MemoryContext(device)
    result = snn_ddqn.train(snn_ddqn.Config.model_validate(config), ctx)
    return result, ctx


NETWORKS = {"ann": {"architecture": "ann"}, "snntorch": {"architecture": "snn", "snn_kernel": "snntorch"},
            "fused": {"architecture": "snn", "snn_kernel": "fused"}}


def throughput(devices: list[str], seconds: float, rounds: int) -> None:
    print(f"\n## env steps per second ({seconds:.0f} s per case in {rounds} interleaved rounds; learning included)\n")
    print("| env | agents | device | ann | snn, snntorch (old) | snn, fused (new) | fused/snntorch | fused/ann |")
    print("|---|---|---|---|---|---|---|---|")
    speedups = []
    for env_id in ("LunarLander-v3", "CartPole-v1"):
        for agents in (1, 8):
            for device in devices:
                # The networks take turns (ann, old, new, ann, ...) so a neighbour's load on this shared
                # machine falls on all three alike.
                steps, spent = dict.fromkeys(NETWORKS, 0), dict.fromkeys(NETWORKS, 0.0)
                for _ in range(rounds):
                    for name, network in NETWORKS.items():
                        config = {**SEED_NET, **network, "env_id": env_id, "agents": agents,
                                  "epsilon_start": 0.1, "epsilon_min": 0.1, "episodes": 10 ** 6,
                                  "train_max_time": seconds / rounds, "stop_learning_at_win_percent": None,
                                  "checkpoint_every": 10 ** 9, "device": device}
                        result, _ = run(config, device)
                        steps[name] += result["env_steps"]
                        spent[name] += result["seconds"]
                rates = {name: steps[name] / spent[name] for name in NETWORKS}
                speedups.append(rates["fused"] / rates["snntorch"])
                print(f"| {env_id} | {agents} | {device} | {rates['ann']:,.0f} | {rates['snntorch']:,.0f} | "
                      f"{rates['fused']:,.0f} | {speedups[-1]:.1f}x | {rates['fused'] / rates['ann']:.2f}x |",
                      flush=True)
    verdict = "met" if min(speedups) >= 5.0 else "NOT met"
    print(f"\nfused vs snntorch: {min(speedups):.1f}x to {max(speedups):.1f}x (target >= 5x in every row: {verdict})")


SOLVERS = {"ann": ("ann", {"architecture": "ann"}),
           "membrane": ("snn, membrane readout", {"architecture": "snn", "readout": "membrane"}),
           "spikes": ("snn, spike readout", {"architecture": "snn", "readout": "spikes"})}


def solve(devices: list[str], seconds: float, episodes: int, solve_at: float, networks: list[str]) -> None:
    print(f"\n## episodes to solve CartPole-v1 (mean return >= {solve_at:g} over 100; at most {episodes} episodes, "
          f"{seconds:.0f} s)\n")
    print("| network | device | solved at episode | best mean return (100) | episodes run | env steps | seconds |")
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        for name, extra in (SOLVERS[n] for n in networks):
            config = {**CARTPOLE_SOLVE, **extra, "stop_at_mean_return": solve_at, "episodes": episodes,
                      "train_max_time": seconds, "device": device}
            result, _ = run(config, device)
            solved = result["solved_at_episode"] if result["solved"] else "not solved"
            print(f"| {name} | {device} | {solved} | {result['best_mean_return']:.1f} | {result['episodes']} | "
                  f"{result['env_steps']:,} | {result['seconds']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "solve", "all"], default="all")
    parser.add_argument("--seconds", type=float, default=20.0, help="wall time per throughput case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per throughput case")
    parser.add_argument("--solve-seconds", type=float, default=600.0, help="time budget per solve run")
    parser.add_argument("--solve-episodes", type=int, default=2000)
    parser.add_argument("--solve-at", type=float, default=195.0, help="mean return over 100 episodes that solves it")
    parser.add_argument("--solve-networks", default="ann,membrane,spikes", help=f"comma-separated: {', '.join(SOLVERS)}")
    parser.add_argument("--devices", default=None, help="comma-separated; default cpu, plus cuda when present")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny nets: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# snn_ddqn bench: torch {torch.__version__}, {args.threads} thread(s), GPU: {gpu}")
    if args.part in ("throughput", "all"):
        throughput(devices, args.seconds, args.rounds)
    if args.part in ("solve", "all"):
        solve(devices, args.solve_seconds, args.solve_episodes, args.solve_at, args.solve_networks.split(","))


if __name__ == "__main__":
    main()
