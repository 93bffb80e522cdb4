"""The analysis of a list of trained models, start to end: `analyze` writes into OUT

    model-<job>.png   PCA of the trial trajectories with that model's fixed and slow points
    distances.png     topology, 1 - CKA and 1 - SVCCA distances between all models
    clusters.png      MDS embeddings and dendrograms of those distances, coloured by learning rule
    summary.json      per model and condition the fixed points (type, unstable dims, q, state), the
                      distance matrices and how well each groups the models by rule
    summary.csv       one row per model and condition: rule, variance, seed, accuracy, point counts

and returns the summary. Every model runs the same trials (one generator, the grid's task and trial length,
input noise `noise`), so trajectory matrices line up row for row across models.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from worker.trainers import learning_rules
from worker.trainers.rnn_dynamics import fixed_points, geometry, plots
from worker.trainers.rnn_dynamics.models import Model

DISTANCES = ("topology", "cka", "svcca")


@dataclass
class Options:
    levels: tuple[float, ...] = (-fixed_points.SIGNAL_MEAN, 0.0, fixed_points.SIGNAL_MEAN)
    trials: int = 64  # shared trials: trajectories, PCA, CKA/SVCCA and the starts of the search
    noise: float = 0.1  # input noise std of those trials (the models' own variances differ across a grid)
    trial_length: int | None = None  # None: the first model's
    starts: int = 256  # initial states of the search per condition, drawn from the trajectories
    iterations: int = 600  # Adam steps of the search
    fixed_tol: float = 1e-12
    slow_tol: float = 1e-6
    svcca_variance: float = 0.99
    svcca_dims: int = 20
    seed: int = 0

    def __post_init__(self):
        for name in ("trials", "starts", "iterations", "svcca_dims"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.trial_length is not None and self.trial_length < 2:
            raise ValueError(f"trial_length must be at least 2; got {self.trial_length}")
        if not self.levels:
            raise ValueError("levels: give at least one signal level")
        if not 0.0 < self.fixed_tol <= self.slow_tol:
            raise ValueError(f"need 0 < fixed_tol <= slow_tol; got {self.fixed_tol} and {self.slow_tol}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0; got {self.noise}")


def _check_alike(models: list[Model]) -> None:
    first = models[0]
    for model in models[1:]:
        if (model.network.units, model.network.inputs, model.config.task) != \
                (first.network.units, first.network.inputs, first.config.task):
            raise ValueError(f"job {model.job_id} ({model.network.units} units, {model.network.inputs} inputs, "
                             f"{model.config.task}) cannot be compared with job {first.job_id} "
                             f"({first.network.units} units, {first.network.inputs} inputs, {first.config.task})")


def shared_trials(models: list[Model], options: Options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs [T, B, I], targets [B], h0 [B, H]: the trials every model runs, from the trainer's task code."""
    first = models[0].config
    length = options.trial_length or first.trial_length
    cfg = first.model_copy(update={"variance": options.noise, "trial_length": length})
    gen = torch.Generator().manual_seed(options.seed)
    inputs, targets = learning_rules.make_trials(cfg, options.trials, gen, dtype=torch.float64)
    h0 = learning_rules.initial_states(cfg, options.trials, gen, dtype=torch.float64)
    return inputs, targets, h0


def analyze_model(model: Model, inputs: torch.Tensor, targets: torch.Tensor, h0: torch.Tensor,
                  labels: list[str], conditions: np.ndarray, options: Options) -> tuple[dict, np.ndarray, list]:
    """One model: its trajectories, accuracy on the shared trials and fixed points per condition."""
    with torch.no_grad():
        states, outputs = model.network.trajectories(inputs, h0)
    accuracy = float(learning_rules.accuracy(outputs[-1], targets))
    flat = states.reshape(-1, model.network.units).numpy()
    # the same draw for every model (same seed, same trial count): starts differ only by the model's states
    picks = np.random.default_rng(options.seed).choice(len(flat), size=options.starts,
                                                       replace=len(flat) < options.starts)
    found = fixed_points.find(model.network, labels, conditions, flat[picks], iterations=options.iterations,
                              fixed_tol=options.fixed_tol, slow_tol=options.slow_tol)
    entry = {
        "job_id": model.job_id, "name": model.name, "rule": model.rule, "variance": model.variance,
        "seed": model.seed, "source": model.source, "val_accuracy": model.val_accuracy, "accuracy": accuracy,
        "conditions": [{"label": c.label, "input": [float(x) for x in c.input], **c.counts,
                        "fixed_points": [p.as_dict() for p in c.fixed],
                        "slow_points": [p.as_dict() for p in c.slow]} for c in found],
    }
    return entry, states.numpy(), found


def analyze(models: list[Model], options: Options, out: Path) -> dict:
    began = time.monotonic()
    _check_alike(models)
    out.mkdir(parents=True, exist_ok=True)
    inputs, targets, h0 = shared_trials(models, options)
    first = models[0]
    labels, conditions = fixed_points.conditions(first.network.inputs, first.config.contexts or 0,
                                                 options.levels, rdm=first.config.rdm)
    entries, matrices, signatures = [], [], []
    for model in models:
        entry, states, found = analyze_model(model, inputs, targets, h0, labels, conditions, options)
        png = plots.plot_model(out / f"model-{model.job_id}.png", f"{model.name}: accuracy {entry['accuracy']:.2f}",
                               states, targets.numpy(), found)
        entry["png"] = png.name
        entries.append(entry)
        matrices.append(states.reshape(-1, model.network.units))
        signatures.append(geometry.topology_signature([c.counts for c in found]))
    distances = {
        "topology": geometry.topology_distances(signatures),
        "cka": geometry.pairwise(matrices, geometry.linear_cka),
        "svcca": geometry.pairwise([geometry.svcca_basis(x, options.svcca_variance, options.svcca_dims)
                                    for x in matrices], geometry.svcca_of_bases),
    }
    names, rules = [m.name for m in models], [m.rule for m in models]
    titles = {"topology": "attractor topology (L1 of counts)", "cka": "1 - linear CKA", "svcca": "1 - SVCCA"}
    shown = {titles[k]: v for k, v in distances.items()}
    plots.plot_distances(out / "distances.png", shown, names)
    plots.plot_clusters(out / "clusters.png", shown, names, rules)
    summary = {
        "models": entries,
        "conditions": labels,
        "distances": {k: v.round(6).tolist() for k, v in distances.items()},
        "grouping_by_rule": {k: geometry.grouping(v, rules) for k, v in distances.items()},
        "options": asdict(options),
        "files": [e["png"] for e in entries] + ["distances.png", "clusters.png", "summary.json", "summary.csv"],
        "seconds": round(time.monotonic() - began, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _write_csv(out / "summary.csv", entries)
    return summary


def _write_csv(path: Path, entries: list[dict]) -> None:
    columns = ["job_id", "name", "rule", "variance", "seed", "val_accuracy", "accuracy", "condition",
               "stable", "saddle", "unstable", "slow"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for e in entries:
            for c in e["conditions"]:
                writer.writerow([e["job_id"], e["name"], e["rule"], e["variance"], e["seed"], e["val_accuracy"],
                                 e["accuracy"], c["label"], c["stable"], c["saddle"], c["unstable"], c["slow"]])


def table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The compact table the command prints: a model a row, `stable/saddle` per condition."""
    columns = ["job", "rule", "variance", "seed", "val acc", "acc"] + summary["conditions"]
    rows = []
    for e in summary["models"]:
        val = "-" if e["val_accuracy"] is None else f"{e['val_accuracy']:.2f}"
        rows.append([str(e["job_id"]), e["rule"], f"{e['variance']:g}", str(e["seed"]), val, f"{e['accuracy']:.2f}",
                     *(f"{c['stable']}/{c['saddle']}" for c in e["conditions"])])
    return columns, rows
