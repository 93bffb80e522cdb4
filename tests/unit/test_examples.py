"""The grid files under examples/ load, expand and validate against their trainer's Config."""
from __future__ import annotations

import collections
import itertools
from pathlib import Path

import yaml

from scheduler.spec import GridSpec, expand, job_key, validate_jobs
from worker import trainers

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FLAGS = ["use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate",
         "use_new_state", "use_old_state", "use_residual"]


def load(name: str) -> GridSpec:
    return GridSpec.model_validate(yaml.safe_load((EXAMPLES / name).read_text()))


def test_seed001_grid_expands_to_the_seeds_432_configs():
    spec = load("seed001_grid.yaml")
    assert spec.trainer == "gated_rnn"
    assert spec.objective_parts == ("min", "min_loss")
    jobs = expand(spec)
    assert len(jobs) == 432
    assert len({j.key for j in jobs}) == 432
    assert all(j.key == job_key("gated_rnn", j.config, j.seed) for j in jobs)

    assert collections.Counter(j.config["n_layers"] for j in jobs) == {1: 144, 2: 144, 3: 144}
    assert collections.Counter(j.config["state_size"] for j in jobs) == {32: 144, 256: 288}
    per_cell = collections.Counter((j.config["n_layers"], j.config["state_size"]) for j in jobs)
    assert per_cell == {(n, s): (48 if s == 32 else 96) for n in (1, 2, 3) for s in (32, 256)}

    # Exactly the seed's init_experiments.py set: the full product filtered by its two rules.
    wanted = set()
    for values in itertools.product([True, False], repeat=7):
        flags = dict(zip(FLAGS, values))
        if not (flags["use_new_state"] or flags["use_old_state"]):
            continue
        for n_layers, state_size in itertools.product([1, 2, 3], [32, 256]):
            if state_size < 256 and not flags["use_residual"]:
                continue
            wanted.add((*values, n_layers, state_size))
    got = {tuple(j.config[k] for k in FLAGS + ["n_layers", "state_size"]) for j in jobs}
    assert got == wanted

    # The seed's training settings, on every job.
    for j in jobs:
        assert {k: j.config[k] for k in ("batch_size", "history", "steps", "lr", "log_every")} == {
            "batch_size": 256, "history": 1000, "steps": 10_000, "lr": 1e-3, "log_every": 50}
        assert j.seed == 0

    validate_jobs(spec, jobs, trainers.validate_config)  # raises InvalidConfig naming the field
    from worker.trainers.gated_rnn import Config

    for j in jobs:
        cfg = Config.model_validate(j.config)
        assert cfg.use_new_state or cfg.use_old_state


def test_demo_grid_validates():
    spec = load("demo.yaml")
    jobs = expand(spec)
    assert jobs
    validate_jobs(spec, jobs, trainers.validate_config)


def test_seed003_grid_compares_wp_spsa_and_bptt():
    spec = load("seed003_grid.yaml")
    jobs = expand(spec)
    methods = collections.Counter(j.config["training"]["gradient_computation"] for j in jobs)
    assert methods == {"wp": 8, "spsa": 8, "bptt": 4}
    assert {j.seed for j in jobs} == {0, 1}
    assert all(j.config["training"]["perturbation"] == 0.001 for j in jobs
               if j.config["training"]["gradient_computation"] == "bptt")
    validate_jobs(spec, jobs, trainers.validate_config)
