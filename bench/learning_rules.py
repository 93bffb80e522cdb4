"""Time per GA generation of seed 004's learning_rules trainer: the batched population against a per-member
loop and against the seed's block-diagonal super-network, side by side in one run.

One generation = the fitness of all P members on one batch of trials (T steps) + selection and mutation.
  batched: one [P, N, N] population, one baddbmm per step for all members (worker/trainers/population.py)
  loop:    the same forward run P times, one member at a time
  block:   the seed's genetic.py: one (P*N) x (P*N) block-diagonal matrix, P x the FLOPs of the others
The block-diagonal network is slow enough on a CPU that it is timed on `--block-steps` steps and scaled to
T (its per-step cost is constant; the printout says so). Fitness of the three is checked equal first.

Part `fused`: M configs of one shape (own seed and variance: a grid's rule x variance x seeds) trained by
learning_rules_fused.train_many in one process vs the same M configs one after another with `train` (one job
at a time), for ga and bptt, side by side in one run, the members' results checked equal to the solo runs'.

  .venv/bin/python bench/learning_rules.py                         # P = 20 and 50, T = 750, batch 500 and 50
  .venv/bin/python bench/learning_rules.py --part fused --members 8 --fused-trial-length 60 --fused-batch 64
  .venv/bin/python bench/learning_rules.py --batches 8 --threads 2    # the seed's batch is 500 trials
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's trainer, not an installed one
from bench.memory_context import MemoryContext  # noqa: E402
from worker.trainers import learning_rules as lr  # noqa: E402
from worker.trainers import learning_rules_fused  # noqa: E402
from worker.trainers import population  # noqa: E402


def block_fitness(cfg: lr.Config, pop: dict, inputs: torch.Tensor, targets: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The seed's super-model: the P networks as one block-diagonal network of P*N units."""
    P, H = population.size(pop), cfg.hidden_size
    J_in = pop["J_in"].reshape(P * H, -1)
    J_rec = torch.block_diag(*pop["J_rec"])
    J_out = torch.block_diag(*pop["J_out"])  # [P, P*H]
    b = pop["b"].reshape(P * H)
    h = h0.repeat(1, P)  # [B, P*H]: every member starts from the same state
    outputs = []
    with torch.no_grad():
        for u in inputs:
            h = (1 - cfg.dt) * h + cfg.dt * (u @ J_in.T + torch.tanh(h) @ J_rec.T + b)
            outputs.append(torch.tanh(torch.tanh(h) @ J_out.T).T)  # [P, B]
    return lr.trial_loss(torch.stack(outputs), targets).mean(-1)


def loop_fitness(cfg, pop, inputs, targets, h0) -> torch.Tensor:
    return torch.stack([lr.fitness(cfg, population.expand(population.member(pop, p), 1), inputs, targets, h0)[0]
                        for p in range(population.size(pop))])


METHODS = {"batched": lr.fitness, "loop": loop_fitness, "block": block_fitness}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_generations(methods: dict, cfg, pop, inputs, targets, h0, gen, repeats: int, device: str) -> dict[str, float]:
    """Best of `repeats` wall times of one generation per method (fitness, then selection and mutation on
    the device). The methods take turns within each repeat, so a change in the machine's load hits all."""
    best = dict.fromkeys(methods, float("inf"))
    clock = clock_for(device)
    for _ in range(repeats):
        for name, (method, steps) in methods.items():
            sync(device)
            start = clock()
            losses = method(cfg, pop, inputs[:steps], targets, h0)
            lr.next_generation(cfg, pop, losses, gen)
            sync(device)
            best[name] = min(best[name], (clock() - start) * len(inputs) / steps)
    return best


def clock_for(device: str):
    """CPU time on a CPU with one thread (a shared machine deschedules long runs more than short ones, and
    wall time would flatter the shorter); wall time on a GPU or with several threads."""
    return time.process_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def kernel_floor(members: int, batch: int, units: int, steps: int, device: str, repeats: int = 20) -> float:
    """Seconds of the two kernels every method must run for `members` networks over `steps` steps: the
    recurrent matmul [members, batch, units] @ [members, units, units] and tanh of the result (the input
    projection and the readout aside). Timed on one step, best of `repeats`."""
    h = torch.randn(members, batch, units, device=device)
    phi, weight = torch.tanh(h), 0.1 * torch.randn(members, units, units, device=device)
    clock, best = clock_for(device), float("inf")
    for _ in range(repeats):
        sync(device)
        start = clock()
        h.baddbmm_(phi, weight, beta=0.9, alpha=0.1)
        torch.tanh(h, out=phi)
        sync(device)
        best = min(best, clock() - start)
    return best * steps


def fused_part(args) -> None:
    """M configs fused vs M solo runs, per rule, taking turns; the clock as for the generations."""
    clock = clock_for(args.device)
    variances = (0.1, 0.5, 1.0)
    print(f"\n{args.members} configs of one shape (CDI N=2, 50 units, T {args.fused_trial_length}, batch "
          f"{args.fused_batch}, {args.fused_validation} validation trials; own seed and variance "
          f"{'/'.join(map(str, variances))}), {args.fused_steps} steps each (stop rule off): train_many vs "
          f"{args.members} solo runs one after another, {args.device}, {torch.get_num_threads()} thread(s), "
          f"{'CPU' if clock is time.process_time else 'wall'} seconds, best of {args.repeats}, taking turns")
    print(f"{'rule':>5} {'networks':>9} {'solo s':>8} {'fused s':>8} {'solo/fused':>11}  same accuracy curves")
    for rule in ("ga", "bptt"):
        cfgs = [lr.Config(rule=rule, variance=variances[i % 3], trial_length=args.fused_trial_length,
                          batch_size=args.fused_batch, validation_trials=args.fused_validation,
                          max_steps=args.fused_steps, stop_accuracy=1.0, log_every=10**6, checkpoint_every=10**6)
                for i in range(args.members)]
        best = {"solo": float("inf"), "fused": float("inf")}
        with tempfile.TemporaryDirectory() as tmp:
            def contexts(kind):
                ctxs = [MemoryContext(args.device, seed=i) for i in range(len(cfgs))]
                for i, ctx in enumerate(ctxs):
                    ctx.workdir = Path(tmp) / kind / str(i)
                return ctxs

            for _ in range(args.repeats):
                sync(args.device)
                start = clock()
                solo = [lr.train(cfg, ctx) for cfg, ctx in zip(cfgs, contexts("solo"))]
                sync(args.device)
                best["solo"] = min(best["solo"], clock() - start)
                start = clock()
                fused = learning_rules_fused.train_many(cfgs, contexts("fused"))
                sync(args.device)
                best["fused"] = min(best["fused"], clock() - start)
        same = all(a["accuracy_curve"] == b["accuracy_curve"] for a, b in zip(solo, fused))
        networks = args.members * (cfgs[0].population_size if rule == "ga" else 1)
        print(f"{rule:>5} {networks:>9} {best['solo']:>8.2f} {best['fused']:>8.2f} "
              f"{best['solo'] / best['fused']:>10.1f}x  {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--populations", default="20,50")
    parser.add_argument("--trial-length", type=int, default=750)
    parser.add_argument("--batches", default="500,50", help="trials per generation (the seed: 500)")
    parser.add_argument("--block-steps", type=int, default=25, help="steps the block-diagonal network is timed on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=["generation", "fused"], default="generation")
    parser.add_argument("--members", type=int, default=8, help="fused: configs in the gang")
    parser.add_argument("--fused-trial-length", type=int, default=60, help="fused (the example grid's short trials)")
    parser.add_argument("--fused-batch", type=int, default=64)
    parser.add_argument("--fused-validation", type=int, default=200)
    parser.add_argument("--fused-steps", type=int, default=10, help="fused: generations or epochs per config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "fused":
        fused_part(args)
        return
    device = args.device
    clock = "CPU" if clock_for(device) is time.process_time else "wall"
    print(f"device {device}, {torch.get_num_threads()} thread(s), CDI N=2, 50 units, T {args.trial_length}; "
          f"seconds per generation ({clock} time, best of {args.repeats}, methods taking turns)")
    print(f"{'P':>4} {'batch':>6} {'batched':>9} {'loop':>9} {'block*':>9} {'loop/batched':>13} "
          f"{'block/batched':>14} {'floor P':>8} {'floor 1xP':>9}  same fitness")
    for batch in (int(b) for b in args.batches.split(",")):
        for P in (int(p) for p in args.populations.split(",")):
            cfg = lr.Config(rule="ga", population=P, trial_length=args.trial_length, batch_size=batch)
            gen = torch.Generator(device=device).manual_seed(0)
            pop = lr.init_network(cfg, gen, members=P)
            inputs, targets = lr.make_trials(cfg, batch, gen)
            h0 = lr.initial_states(cfg, 1, gen).expand(batch, cfg.hidden_size)
            short = inputs[:8]  # the three agree on the fitness (checked on a few steps: the block network is slow)
            reference = lr.fitness(cfg, pop, short, targets, h0)
            same = all(torch.allclose(reference, METHODS[m](cfg, pop, short, targets, h0), rtol=1e-4, atol=1e-5)
                       for m in ("loop", "block"))
            steps = min(args.block_steps, args.trial_length)
            methods = {"batched": (lr.fitness, args.trial_length), "loop": (loop_fitness, args.trial_length),
                       "block": (block_fitness, steps)}
            t = time_generations(methods, cfg, pop, inputs, targets, h0, gen, args.repeats, device)
            floor = kernel_floor(P, batch, cfg.hidden_size, args.trial_length, device)
            floor_one = P * kernel_floor(1, batch, cfg.hidden_size, args.trial_length, device)
            print(f"{P:>4} {batch:>6} {t['batched']:>9.3f} {t['loop']:>9.3f} {t['block']:>9.3f} "
                  f"{t['loop'] / t['batched']:>12.1f}x {t['block'] / t['batched']:>13.1f}x {floor:>8.3f} "
                  f"{floor_one:>9.3f}  {same}", flush=True)
    print(f"* block: timed on {min(args.block_steps, args.trial_length)} steps, scaled to {args.trial_length}. "
          "floor P: the recurrent baddbmm + tanh alone for the P members at once, floor 1xP: for one member, "
          "P times (what any loop must pay). Targets (issue 10): loop/batched >= 10x, block/batched >= 3x on CPU.")


if __name__ == "__main__":
    main()
