"""Step time of seed 000's block model: masked dense vs sparse CSR, across densities and hidden sizes.

One "step" = forward over a sequence of --steps iterations, backward, and an Adam update, batch --batch,
on the real BlockRNN (worker/trainers/iterativenn/blocks.py). The description is Adroit door's frame,
[39, hidden, 28], every block below the first row `R=density`, trainable `non-zero`, ReLU on h.
Prints milliseconds per step for each representation, the ratio dense/sparse (> 1: sparse is faster),
and what `choose_representation` picks at that point.

    python bench/sparse_vs_dense.py                       # CPU (about 2 minutes on 2 cores)
    python bench/sparse_vs_dense.py --repeats 5 --device cuda
    python bench/sparse_vs_dense.py --sizes 300,1000 --densities 0.01,0.1,1
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker.trainers.iterativenn.blocks import (
    BlockRNN,
    Description,
    choose_representation,
)

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR "beta" and invariant-check notices


def description(hidden: int, density: float) -> Description:
    sizes = [39, hidden, 28]
    kind = f"R={density}"
    return Description.parse(
        sizes,
        [[0, 0, 0], [kind] * 3, [kind] * 3],
        [[0, 0, 0], ["G=0,0.05"] * 3, ["G=0,0.05"] * 3],
        [[False] * 3, ["non-zero"] * 3, ["non-zero"] * 3],
        ["Identity", "ReLU", "Identity"],
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_ms(model: BlockRNN, x: torch.Tensor, y: torch.Tensor, repeats: int, device: str) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def one() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    one()  # warm-up: allocations, kernels, Adam state
    times: list[float] = []
    spent = 0.0
    # --repeats 0: repeat until 0.5 s measured (2..20 times). Best of: on a shared machine other people's
    # work only ever adds time, so the minimum is the least noisy estimate.
    while len(times) < (repeats or 20) and (repeats or spent < 0.5 or len(times) < 2):
        sync(device)
        began = time.perf_counter()
        one()
        sync(device)
        times.append((time.perf_counter() - began) * 1000)
        spent += times[-1] / 1000
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300,1000,3000", help="hidden sizes")
    parser.add_argument("--densities", default="0.01,0.02,0.05,0.1,0.2,0.5,1.0")
    parser.add_argument("--repeats", type=int, default=0, help="0: until 0.5 s measured, 2 to 20 times")
    parser.add_argument("--steps", type=int, default=10, help="sequence length (iterations)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    sizes = [int(s) for s in args.sizes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; batch {args.batch}, {args.steps} iterations per sequence, forward+backward+Adam, "
          f"best of {args.repeats or '2-20 (0.5 s)'} repeats")
    print(f"{'hidden':>6} {'density':>8} {'dense ms':>9} {'sparse ms':>9} {'dense/sparse':>12}  auto picks")
    began = time.perf_counter()
    for hidden in sizes:
        for density in densities:
            desc = description(hidden, density)
            x = torch.randn(args.batch, args.steps, 39, device=device)
            y = torch.randn(args.batch, args.steps, 28, device=device)
            times = {}
            for rep in ("dense", "sparse"):
                model = BlockRNN(desc, rep, torch.Generator().manual_seed(0)).to(device)
                times[rep] = step_ms(model, x, y, args.repeats, device)
                real_density = model.describe()["density"]
                del model
            pick = choose_representation(real_density, desc.n, device)
            print(f"{hidden:>6} {density:>8.0%} {times['dense']:>9.1f} {times['sparse']:>9.1f} "
                  f"{times['dense'] / times['sparse']:>11.2f}x  {pick}", flush=True)
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
