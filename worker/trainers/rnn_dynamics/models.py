"""A grid's result rows -> its trained networks, each with the config facts the analysis groups by.

Rows are what `scheduler.reports.grid_results` (and the API's /grids/{grid}/results) return. A succeeded
learning_rules job names its matrices.npz in `result.matrices` (in the worker's job folder); where that file
is not on this machine (another worker, a fleet) the job's final checkpoint holds the same matrices under
`params`, and is read through the job's checkpoint pointer from its store (local or hf://).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from common.checkpoints import StoreOptions
from common.stores import load_checkpoint
from worker.trainers import learning_rules
from worker.trainers.rnn_dynamics.network import BadNetwork, Network

TRAINER = "learning_rules"


class NoModels(ValueError):
    """Nothing to analyse: the grid is no learning_rules grid, or none of its jobs has succeeded yet."""


@dataclass
class Model:
    job_id: int
    seed: int
    config: learning_rules.Config
    val_accuracy: float | None  # the trainer's own, from the result
    network: Network
    source: str  # "matrices.npz" or "checkpoint"

    @property
    def rule(self) -> str:
        return self.config.rule

    @property
    def variance(self) -> float:
        return self.config.variance

    @property
    def name(self) -> str:
        return f"{self.rule} v{self.variance:g} s{self.seed} #{self.job_id}"


def load_models(trainer: str, rows: list[dict[str, Any]], local_root: Path,
                options: StoreOptions) -> tuple[list[Model], list[str]]:
    """The succeeded jobs' networks, in job order, and one line per succeeded job that could not be read."""
    if trainer != TRAINER:
        raise NoModels(f"the analysis reads {TRAINER} jobs; this grid's trainer is '{trainer}'")
    models, problems = [], []
    for row in sorted(rows, key=lambda r: r["job_id"]):
        if row["state"] != "succeeded":
            continue
        # RuntimeError: common.hub_store's HubStoreError, without importing huggingface_hub for local grids
        try:
            models.append(_model(row, local_root, options))
        except (ValidationError, BadNetwork, OSError, RuntimeError, KeyError, ValueError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            problems.append(f"job {row['job_id']}: {type(exc).__name__}: {first_line}")
    if not models:
        states = sorted({row["state"] for row in rows})
        raise NoModels("no succeeded job could be read" + (f" ({'; '.join(problems)})" if problems else
                       f" (job states: {', '.join(states) or 'no jobs'})"))
    return models, problems


def _model(row: dict[str, Any], local_root: Path, options: StoreOptions) -> Model:
    cfg = learning_rules.Config.model_validate(row["config"])
    result = row.get("result") or {}
    path = result.get("matrices")
    if isinstance(path, str) and Path(path).is_file():
        network, source = Network.from_matrices(learning_rules.load_matrices(path)), "matrices.npz"
    else:
        pointer = row.get("checkpoint")
        if not pointer:
            raise FileNotFoundError(f"matrices {path!r} are not on this machine and the job recorded no checkpoint")
        state = load_checkpoint(pointer, local_root, options)
        # the same dt and dynamics learning_rules.save_matrices records: full-FORCE runs tanh at ff_dt / ff_tau
        dt = cfg.ff_dt / cfg.ff_tau if cfg.rule == "ff" else cfg.dt
        dynamics = "tanh" if cfg.rule == "ff" else cfg.dynamics
        params = {k: v.detach().cpu().double().numpy() for k, v in state["params"].items()}
        network, source = Network.from_matrices(params, dt=dt, dynamics=dynamics), "checkpoint"
    accuracy = result.get("val_accuracy")
    return Model(row["job_id"], int(row.get("seed") or 0), cfg,
                 float(accuracy) if isinstance(accuracy, (int, float)) else None, network, source)
