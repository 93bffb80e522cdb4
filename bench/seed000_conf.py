"""Run sparse_rnn's converter over a whole checkout of seed 000's conf/ folder and print the counts.

    python bench/seed000_conf.py /path/to/iterativenn/conf [--list]

Model files (conf/model/**.yaml): each is validated as a sparse_rnn config and its model is built at the
sizes the file writes (x, and the y units its loss reads), which names the data set it trains on
(RandomAnomaly or the MNIST sequences 2500/10, Adroit door 39/28, hammer 46/26, kitchen 83/9, 71/9 desired goals only, 81/9
complete). Data files (conf/data/**.yaml): each is validated as a `data` section. Printed: loaded (by
data set), and rejected grouped by the reason's first clause. Nothing is trained and nothing downloaded.
Not a timing benchmark: it lives here because the top-level layout is fixed (docs/sparse_rnn.md).
"""
from __future__ import annotations

import argparse
import collections
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from worker.trainers.sparse_rnn import Config, build_model, config_from_hydra  # noqa: E402

# (x, y) sizes -> the seed's data set for them (the data file / DataFactory that produced those sizes)
SIZES_TO_DATA = {
    (2500, 10): "random_anomaly or MNIST sequences", (39, 28): "adroit_door", (46, 26): "adroit_hammer",
    (83, 9): "franka_kitchen", (71, 9): "franka_kitchen (desired goals only, DataFactoryFKB)",
    (81, 9): "kitchencomplete",
    (8, 4): "lunar (gym rollouts: data not supported)", (4, 2): "cartpole (gym rollouts: data not supported)",
    (6, 3): "acrobot (gym rollouts: data not supported)",
}


def reason(exc: Exception) -> str:
    """The first clause of an error: pydantic's message without its location and input echo."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        text = (f"{where}: " if where else "") + err["msg"].removeprefix("Value error, ")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return ": ".join(text.split(" [type=")[0].split(": ")[:2])[:160]  # key and what is wrong, not why


def model_sizes(cfg: Config) -> tuple[int | None, int | None]:
    units = cfg.loss_units()
    if cfg.model_type == "description" and cfg.row_sizes:
        x = cfg.row_sizes[0]
    elif cfg.model_type == "mlp" and cfg.sizes:
        x = cfg.sizes[0]
    else:
        x = cfg.input_size
    y = cfg.declared_sizes()[1] if units is None else units[1] - units[0]
    return x, y


def check_model(path: Path) -> tuple[str, str]:
    """('loaded', data set) or ('rejected', reason)."""
    try:
        cfg = Config.model_validate(config_from_hydra({}, {}, path))
        x, y = model_sizes(cfg)
        if x is None or y is None:
            return "rejected", "the file gives no input/output sizes"
        data = types.SimpleNamespace(input_size=x, output_size=y, name=f"{x}/{y}")
        build_model(cfg, data, seed=0, device="cpu", representation=None)
    except (ValidationError, ValueError) as exc:
        return "rejected", reason(exc)
    return "loaded", SIZES_TO_DATA.get((x, y), f"x {x} / y {y}: no seed data file has these sizes")


def check_data(path: Path) -> tuple[str, str]:
    try:
        cfg = Config.model_validate(config_from_hydra({}, path, {}))
    except (ValidationError, ValueError) as exc:
        return "rejected", reason(exc)
    return "loaded", cfg.data.dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("conf", type=Path, help="seed 000's conf/ folder")
    parser.add_argument("--list", action="store_true", help="print every file's outcome")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for part, check in (("model", check_model), ("data", check_data)):
        files = sorted((args.conf / part).rglob("*.yaml"))
        counts: collections.Counter = collections.Counter()
        for path in files:
            outcome, detail = check(path)
            counts[(outcome, detail)] += 1
            if args.list:
                print(f"  {outcome:8s} {path.relative_to(args.conf)}: {detail}")
        loaded = sum(n for (o, _), n in counts.items() if o == "loaded")
        print(f"conf/{part}: {len(files)} files, {loaded} loaded, {len(files) - loaded} rejected")
        for (outcome, detail), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
            print(f"  {outcome:8s} {n:4d}  {detail}")


if __name__ == "__main__":
    main()
