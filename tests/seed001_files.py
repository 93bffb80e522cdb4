"""Small files in the format of seed 001's own (ASFaust/SLMfun, SystematicRNNExploration): rnn_configs.json as
init_experiments.py writes it, results_01_all/<id>.json as training_01_all.py writes it (a claim with the
start time first, the finished run after). Written here with the seed's serialisation, independently of
worker/trainers/slmfun.py, so the reader is checked against the format and not against itself."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

FLAGS = ["use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate", "use_new_state",
         "use_old_state", "use_residual"]
# A real entry of the seed's results_01_all: this config is stored there under this id.
REAL_CONFIG = {"use_input_gate": False, "use_forget_gate": False, "use_output_gate": False, "use_state_gate": False,
               "use_new_state": True, "use_old_state": True, "use_residual": False, "n_layers": 2, "state_size": 256}
REAL_ID = "00fff5ea2993a3d7c03ddf1e8356fe917578d7eedce95b5b04260f659b411b55"


def seed_configs() -> list[dict]:
    """All 432 of the seed's configs, with ids, in init_experiments.py's order."""
    out = []
    for values in itertools.product([True, False], repeat=7):
        flags = dict(zip(FLAGS, values))
        if not (flags["use_new_state"] or flags["use_old_state"]):
            continue
        for n_layers, state_size in itertools.product([1, 2, 3], [32, 256]):
            config = {**flags, "n_layers": n_layers, "state_size": state_size}
            if state_size < 256 and not config["use_residual"]:
                continue
            config["id"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()
            out.append(config)
    return out


def write_configs(folder: Path, configs: list[dict]) -> Path:
    path = folder / "rnn_configs.json"
    path.write_text(json.dumps(configs, indent=4))
    return path


def write_result(folder: Path, config: dict, min_loss: float, start: float = 1730481804.39,
                 points: int = 219, finished: bool = True, **changes) -> Path:
    """A results_01_all/<id>.json; `finished=False` leaves the claim the seed writes before training."""
    folder.mkdir(parents=True, exist_ok=True)
    info = {"start time": start, **config}
    if finished:
        curve = [3.5 - (3.5 - min_loss) * i / (points - 1) for i in range(points)]
        info.update({"loss": curve, "min loss": min(curve), "training steps": 10000, "batch size": 256,
                     "history size": 1000, "dataset": "enwik8", "end time": start + 1800.5})
        info.update(changes)
    path = folder / f"{config['id']}.json"
    path.write_text(json.dumps(info, indent=4))
    return path
