"""gated_rnn (seed 001): 16 same-shape configs fused into one model vs run one by one vs the seed's way.

Four ways to train the same 16 configs (seed 001's gate-flag combos at one n_layers/state_size, batch 256,
window 1000, Adam lr 1e-3, a few steps each), measured in the same run so the ratios compare like with like,
every process with one torch thread (two threads per process on two shared cores only oversubscribe them):
- fused x1: `gated_fused.train_many` on all 16 in one process (worker/trainers/gated_fused.py);
- fused x2: two processes, a gang of 8 in each (two workers, each running one gang);
- sequential: 16 `gated_rnn.train` runs one after another in one process (one job at a time);
- seed's way: two processes, each running its 8 configs one after another, as the seed ran two
  training processes side by side.
The worker processes are started and warmed (torch imported, one tiny run) before the clock starts.
Each solo run loads its corpus, as a job does, and the fused run once: 1 MB of the stdlib's sources,
written to a temporary file first so that reading it costs little. Target: fused x2 >= 3x the seed's
way on 2 CPU cores.

Beside them: `floor`, the step's matmuls alone (forward and both backward products of every Linear but
the embedding's lookup, batched over the members that share a shape) for the same steps in one process:
what any stacked step pays at this machine's GEMM speed, so sequential/floor bounds x1/sequential. With
`--before REF` the fused runs are timed a second time with gated_fused.py as it was at that git commit
(its file loaded as a module), in the same run, before/after side by side.

With --device cuda it also times one fused gang per shape group of the seed's 432-config grid (48 or 96
members) for --gpu-steps steps and projects the whole grid at the seed's 10,989 steps (10,000 asked,
finish_window). Without a GPU that line says "not measured".

    python bench/fused.py                            # state 32 and 256 on the CPU (about 3 minutes)
    python bench/fused.py --sizes 32 --steps 200
    python bench/fused.py --device cuda --gpu-steps 30
    python bench/fused.py --before 6d0dc17           # and the fused runs of gated_fused.py at that commit
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.memory_context import MemoryContext
from worker.trainers import gated_fused, gated_rnn

FLAGS = ["use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate",
         "use_new_state", "use_old_state", "use_residual"]
SEED_TRAINING = {"batch_size": 256, "history": 1000, "lr": 1e-3, "log_every": 50,
                 "corpus_bytes": 1_000_000, "checkpoint_every": 10 ** 9}  # corpus: a file, set in main()
SEED_END_STEP = 10_989  # 10,000 asked, windows of 999: the seed's run length


def seed_flag_combos(residual_only: bool) -> list[dict]:
    combos = []
    for values in itertools.product([False, True], repeat=7):
        flags = dict(zip(FLAGS, values))
        if (flags["use_new_state"] or flags["use_old_state"]) and (flags["use_residual"] or not residual_only):
            combos.append(flags)
    return combos


def configs(size: int, n_layers: int, steps: int, count: int) -> list[dict]:
    """`count` of the seed's flag combos for this shape, spread over the list (size 32: residual only)."""
    combos = seed_flag_combos(residual_only=size == 32)
    chosen = combos[:: max(1, len(combos) // count)][:count]
    return [{**flags, **SEED_TRAINING, "n_layers": n_layers, "state_size": size, "steps": steps} for flags in chosen]


def solo(config: dict, seed: int, device: str = "cpu") -> float:
    result = gated_rnn.train(gated_rnn.Config.model_validate(config), MemoryContext(device, seed))
    return result["final_loss"]


def _one_thread() -> None:
    torch.set_num_threads(1)


def _fused_module(before: str | None):
    """gated_fused, or the copy of an older gated_fused.py at `before` (a file) loaded as its own module."""
    if before is None:
        return gated_fused
    if "gated_fused_before" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gated_fused_before", before)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules["gated_fused_before"]


def fused(cfgs: list[dict], seeds: list[int], device: str = "cpu", before: str | None = None) -> list:
    models = [gated_rnn.Config.model_validate(c) for c in cfgs]
    return _fused_module(before).train_many(models, [MemoryContext(device, seed) for seed in seeds])


def matmul_floor(cfgs: list[dict], steps: int) -> float:
    """Seconds of the configs' matmuls alone for `steps` steps: per solo weight shape [out, in], stacked over
    the members that have it (U), x [U, B, in] @ W^T, then the backward's g @ W and g^T @ x."""
    batch, groups = cfgs[0]["batch_size"], {}
    for config in cfgs:
        for name, p in gated_rnn.GatedRNN(gated_rnn.Config.model_validate(config)).named_parameters():
            if name.endswith("weight") and not name.startswith("embed"):
                groups.setdefault((name, tuple(p.shape)), []).append(p.detach())
    operands = []
    for (_, (out, inp)), weights in groups.items():
        w = torch.stack(weights)
        operands.append((w, torch.randn(len(weights), batch, inp), torch.randn(len(weights), batch, out)))
    with torch.no_grad():
        began = time.perf_counter()
        for _ in range(steps):
            for w, x, g in operands:
                torch.bmm(x, w.transpose(1, 2)), torch.bmm(g, w), torch.bmm(g.transpose(1, 2), x)
        return time.perf_counter() - began


def time_fused(cfgs: list[dict], device: str, before: str | None = None) -> float:
    began = time.perf_counter()
    results = fused(cfgs, list(range(len(cfgs))), device, before)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - began
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"fused members failed: {failed[:3]}")
    return elapsed


def time_sequential(cfgs: list[dict]) -> float:
    began = time.perf_counter()
    for seed, config in enumerate(cfgs):
        solo(config, seed)
    return time.perf_counter() - began


def solo_cpu(config: dict, seed: int) -> float:
    """`solo` in a pool worker; the CPU seconds it took there."""
    began = time.process_time()
    solo(config, seed)
    return time.process_time() - began


def fused_cpu(cfgs: list[dict], seeds: list[int], device: str, before: str | None) -> tuple[int, float]:
    """`fused` in a pool worker: how many members failed, and the CPU seconds it took there."""
    began = time.process_time()
    failed = sum(isinstance(r, Exception) for r in fused(cfgs, seeds, device, before))
    return failed, time.process_time() - began


def time_seeds_way(cfgs: list[dict], pool) -> tuple[float, float]:
    """Wall seconds, and CPU seconds summed over the two processes (what neighbours' load cannot inflate)."""
    began = time.perf_counter()
    cpu = pool.starmap(solo_cpu, [(config, seed) for seed, config in enumerate(cfgs)], chunksize=1)
    return time.perf_counter() - began, sum(cpu)


def time_fused_pair(cfgs: list[dict], pool, before: str | None = None) -> tuple[float, float]:
    half = len(cfgs) // 2
    began = time.perf_counter()
    outcomes = pool.starmap(fused_cpu, [(cfgs[:half], list(range(half)), "cpu", before),
                                        (cfgs[half:], list(range(half, len(cfgs))), "cpu", before)])
    elapsed = time.perf_counter() - began
    if any(failed for failed, _ in outcomes):
        raise RuntimeError("fused members failed")
    return elapsed, sum(cpu for _, cpu in outcomes)


def cpu_table(sizes: list[int], steps: dict[int, int], n_layers: int, count: int, before: str | None,
              rounds: int) -> None:
    _one_thread()
    warm = [configs(8, 1, 2, 2)[0] | {"state_size": 8}] * 2
    fused(warm, [0, 1])  # imports (the first optimizer imports torch._dynamo: 1-2 s) in this process too
    if before:
        fused(warm, [0, 1], "cpu", before)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2, initializer=_one_thread) as pool:
        pool.starmap(fused, [(warm, [0, 1])] * 2)
        if before:
            pool.starmap(fused, [(warm, [0, 1], "cpu", before)] * 2)
        print(f"CPU, one thread per process; {count} configs, n_layers {n_layers}, "
              f"batch {SEED_TRAINING['batch_size']}, window 1000; best of {rounds} rounds; "
              f"load average {os.getloadavg()[0]:.1f} at the start")
        head = (f"{'state':>6} {'steps':>6} {'fused x1 s':>11} {'sequential s':>13} {'fused x2 s':>11} "
                f"{'seed way s':>11} {'floor s':>8} {'x1/sequential':>14} {'seq/floor':>10} {'x2/seed way':>12} "
                f"{'same, CPU s':>12}")
        print(head + (f" {'x1 before s':>12} {'x2 before s':>12} {'x2/seed way before':>19}" if before else ""))
        ratios, ratios_before, cpu_ratios = [], [], []
        for size in sizes:
            cfgs = configs(size, n_layers, steps[size], count)
            ways = {"one": lambda: time_fused(cfgs, "cpu"), "sequential": lambda: time_sequential(cfgs),
                    "floor": lambda: matmul_floor(cfgs, steps[size]), "two": lambda: time_fused_pair(cfgs, pool),
                    "seeds_way": lambda: time_seeds_way(cfgs, pool)}
            if before:
                ways |= {"one_before": lambda: time_fused(cfgs, "cpu", before),
                         "two_before": lambda: time_fused_pair(cfgs, pool, before)}
            best = {}
            for _ in range(rounds):  # the ways take turns, best of the rounds: a neighbour's load spike hits all
                for way, timed in ways.items():
                    seconds = timed()
                    if isinstance(seconds, tuple):  # the two-process ways: (wall, CPU of both processes)
                        seconds, best[way + "_cpu"] = seconds[0], min(best.get(way + "_cpu", float("inf")), seconds[1])
                    best[way] = min(best.get(way, float("inf")), seconds)
            one, sequential, floor, two, seeds_way = (best[k] for k in ("one", "sequential", "floor", "two", "seeds_way"))
            cpu_ratios.append(best["seeds_way_cpu"] / best["two_cpu"])
            one_before, two_before = best.get("one_before"), best.get("two_before")
            ratios.append(seeds_way / two)
            line = (f"{size:>6} {steps[size]:>6} {one:>11.2f} {sequential:>13.2f} {two:>11.2f} {seeds_way:>11.2f} "
                    f"{floor:>8.2f} {sequential / one:>13.2f}x {sequential / floor:>9.2f}x {seeds_way / two:>11.2f}x "
                    f"{cpu_ratios[-1]:>11.2f}x")
            if before:
                ratios_before.append(seeds_way / two_before)
                line += f" {one_before:>12.2f} {two_before:>12.2f} {seeds_way / two_before:>18.2f}x"
            print(line)
    verdict = "met" if min(ratios) >= 3.0 else "NOT met"
    print(f"fused x2 vs the seed's way: {min(ratios):.2f}x to {max(ratios):.2f}x "
          f"(target >= 3x in every row: {verdict})")
    print(f"the same in CPU seconds of the two processes (not inflated by neighbours' load): "
          f"{min(cpu_ratios):.2f}x to {max(cpu_ratios):.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if before:
        print(f"the same with gated_fused.py before: {min(ratios_before):.2f}x to {max(ratios_before):.2f}x")


def gpu_projection(steps: int, device: str) -> None:
    """Time one fused gang per shape group of the seed's grid; project the grid at 10,989 steps."""
    total, rows = 0.0, []
    for n_layers, size in itertools.product([1, 2, 3], [32, 256]):
        group = [{**flags, **SEED_TRAINING, "n_layers": n_layers, "state_size": size}
                 for flags in seed_flag_combos(residual_only=size == 32)]
        time_fused([c | {"steps": 2} for c in group], device)  # warm-up: kernels, allocator
        # best of two each: one slow set-up would otherwise make the difference wrong, even negative
        base = min(time_fused([c | {"steps": 2} for c in group], device) for _ in range(2))  # set-up, 2 steps
        seconds = min(time_fused([c | {"steps": steps + 2} for c in group], device) for _ in range(2))
        per_step = (seconds - base) / steps  # the set-up (models, corpus) is not part of the 10,989 steps
        total += per_step * SEED_END_STEP
        rows.append(f"L{n_layers} S{size}: {len(group)} members, {per_step * 1000:.1f} ms/step")
    print(f"{device} projection from {steps} measured steps per group: " + "; ".join(rows))
    verdict = "met" if total <= 15 * 60 else "NOT met"
    print(f"projected: the 432-config grid at {SEED_END_STEP} steps in {total / 60:.1f} min on one device, 6 gangs "
          f"one after another (target <= 15 min: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,256", help="state sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="steps per config (default: 60 at 32, 10 at 256)")
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="batch size (the seed's: 256)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the grid projection as well")
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="every way this many times, taking turns; best kept")
    parser.add_argument("--before", default=None, help="a git commit: also time gated_fused.py as it was there")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gf_fused_"))
    try:
        before = None
        if args.before:
            before = folder / "gated_fused_before.py"
            source = subprocess.run(["git", "show", f"{args.before}:worker/trainers/gated_fused.py"], check=True,
                                    capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            before.write_text(source.stdout)
            before = str(before)
        corpus = folder / "stdlib.txt"
        text = gated_rnn.load_corpus("stdlib", SEED_TRAINING["corpus_bytes"])
        corpus.write_bytes(bytes(text.to(torch.uint8).tolist()))
        SEED_TRAINING["corpus"] = str(corpus)
        SEED_TRAINING["batch_size"] = args.batch
        sizes = [int(s) for s in args.sizes.split(",")]
        steps = {size: args.steps or (60 if size <= 64 else 10) for size in sizes}
        cpu_table(sizes, steps, args.n_layers, args.configs, before, args.rounds)
        if args.device == "cuda" and torch.cuda.is_available():
            gpu_projection(args.gpu_steps, "cuda")
        else:
            print("GPU projection for the 432-config grid: not measured (no CUDA device; run with --device cuda)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
