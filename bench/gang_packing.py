"""Packing by memory on a GPU: one member's dry step per fused trainer, the K it gives, and whether K members
really fit.

For each fused trainer, at a seed-like shape: one member's dry step (worker/dry_step.py, exactly what a gang's
child runs: the trainer's own `train_many([cfg], [DryContext])` until its first report) measured with
torch.cuda's peak counter, the device's free memory, K = gang_size.fit_on_device(--gang, member, free),
and then a check: `--check` members (or K, when fewer) dry-stepped together as one gang, their measured
peak beside the predicted members x member bytes (a ratio <= 1: the prediction is on the safe side).
Printed: one line per trainer. On a CPU (`--device cpu`) nothing can be measured: it prints the dry step's
seconds and K = the setting, as the agent does there.

    python bench/gang_packing.py --device cuda [--gang 64] [--check 16] [--trainers gated_rnn,snn_ddqn]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import dry_step, gang_size, trainers  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. to be or not to be. "
MIB = 2**20


def configs(corpus: Path) -> dict[str, dict]:
    """Seed-like shapes: seed 001's state 256 at batch 256 and window 1000; seed 000's block model; seed 002's
    agents; seeds 003/004 at their defaults. Long runs: the dry step stops them."""
    return {
        "gated_rnn": {"state_size": 256, "n_layers": 2, "batch_size": 256, "history": 1000, "steps": 10_000,
                      "corpus": str(corpus), "log_every": 1},
        "sparse_rnn": {"hidden_size": 256, "max_epochs": 100, "log_every": 1,
                       "data": {"dataset": "random_anomaly", "image_size": 16, "train_size": 512, "batch_size": 64}},
        "snn_ddqn": {"env_id": "CartPole-v1", "episodes": 1000},
        "perturbation": {"training": {"log_every": 1}},
        "learning_rules": {"rule": "bptt", "log_every": 1},
        "noop": {"steps": 10, "fuse_group": "a"},
        "curve": {"steps": 10, "fuse_group": "a"},
    }


def like(device: str, seed: int = 0) -> SimpleNamespace:
    return SimpleNamespace(job_id=1, grid_id=1, seed=seed, attempt=1, device=device)


def one(trainer: str, raw: dict, device: str, gang: int, check: int, memory=None) -> str:
    """One trainer's line. `memory`: dry_step.CudaMemory on a GPU; None on a CPU (nothing to read)."""
    module, fused = trainers.load(trainer), trainers.load_fused(trainer)
    cfg = module.Config.model_validate(raw)
    if memory is None:
        began = time.perf_counter()
        dry = dry_step.DryContext(like(device), Path(tempfile.mkdtemp()))
        outcome = fused.train_many([cfg], [dry])[0]
        return (f"{trainer:15s} dry step {time.perf_counter() - began:6.2f} s -> {outcome}; "
                f"K = the setting {gang} (no memory reading on a CPU)")
    began = time.perf_counter()
    member = dry_step.measure(fused.train_many, cfg, like(device), memory)
    seconds = time.perf_counter() - began
    free, total = memory.free()
    k = gang_size.fit_on_device(gang, member, gang_size.budget(free, total))
    n = min(k, check)
    base = memory.allocated()
    memory.reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        drys = [dry_step.DryContext(like(device, seed=i), Path(tmp) / str(i)) for i in range(n)]
        outcomes = fused.train_many([cfg] * n, drys)
    actual = memory.peak() - base
    memory.release()
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    ratio = actual / (n * member) if member else float("nan")
    return (f"{trainer:15s} member {member / MIB:9.2f} MiB (dry step {seconds:5.2f} s), free {free / MIB:9.0f} MiB "
            f"of {total / MIB:.0f}: K = {k:5d} (setting {gang}); {n} members together {actual / MIB:9.2f} MiB = "
            f"{ratio:.2f}x {n} x member" + (f"; {len(failed)} failed: {failed[0]!r}" if failed else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gang", type=int, default=1024, help="the gang_size setting that caps K")
    parser.add_argument("--check", type=int, default=16, help="members dry-stepped together to check K")
    parser.add_argument("--trainers", default=",".join(sorted(trainers.FUSED)))
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu, or on a GPU machine")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(TEXT * 2000)
        raw = configs(corpus)
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"gang_packing on {name}: one member's dry step, K from free memory (reserve "
              f"{gang_size.RESERVE:.0%}), then min(K, {args.check}) members together")
        for trainer in args.trainers.split(","):
            try:
                memory = dry_step.CudaMemory(args.device) if args.device == "cuda" else None
                print(one(trainer, raw[trainer], args.device, args.gang, args.check, memory), flush=True)
            except Exception as exc:  # noqa: BLE001 - one trainer's failure is a line of the report, not the end
                print(f"{trainer:15s} failed: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
