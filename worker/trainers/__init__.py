"""Trainers: one file each, with a pydantic `Config` and `train(config, ctx) -> dict` (and, optionally,
`external_id(config)`: the id its users know a config by, and `fuse_key(config)`: configs sharing it can be
trained as one stacked model, so a gang claim takes them together). A trainer that fuses has a module of its
own beside it, named in FUSED, with `train_many(configs, ctxs)`: it builds on the trainer's model, so the
trainer does not import it back.

Modules are imported lazily so validating a `noop` grid never imports torch.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

TRAINERS: dict[str, str] = {
    "noop": "worker.trainers.noop",
    "sleep": "worker.trainers.sleep",
    "curve": "worker.trainers.curve",
    "gated_rnn": "worker.trainers.gated_rnn",
    "command": "worker.trainers.command",
    "sparse_rnn": "worker.trainers.sparse_rnn",
    "snn_ddqn": "worker.trainers.snn_ddqn",
    "learning_rules": "worker.trainers.learning_rules",
    "perturbation": "worker.trainers.perturbation",
    "objective": "worker.trainers.objective",
}

FUSED: dict[str, str] = {
    "gated_rnn": "worker.trainers.gated_fused",
    "perturbation": "worker.trainers.perturbation_fused",
    "learning_rules": "worker.trainers.learning_rules_fused",
    "sparse_rnn": "worker.trainers.sparse_fused",
    "snn_ddqn": "worker.trainers.snn_fused",
    "noop": "worker.trainers.noop",  # a test trainer: its own module trains gangs (without torch)
    "curve": "worker.trainers.curve",  # the same, for early stopping of gang members (known loss curves)
}


class UnknownTrainer(LookupError):
    def __init__(self, name: str):
        known = ", ".join(sorted(TRAINERS))
        super().__init__(f"unknown trainer '{name}'; known trainers: {known}")
        self.name = name


class InvalidConfig(ValueError):
    """The trainer's Config rejected a config. `errors` holds (field, message) pairs."""

    def __init__(self, trainer: str, errors: list[tuple[str, str]]):
        detail = "; ".join(f"{field}: {msg}" for field, msg in errors)
        super().__init__(f"config rejected by trainer '{trainer}': {detail}")
        self.trainer = trainer
        self.errors = errors


def known_trainers() -> list[str]:
    return sorted(TRAINERS)


def load(name: str) -> ModuleType:
    if name not in TRAINERS:
        raise UnknownTrainer(name)
    return importlib.import_module(TRAINERS[name])


def load_fused(name: str) -> ModuleType | None:
    """The module with `train_many(configs, ctxs)` for a trainer that trains gangs as one model, or None."""
    load(name)  # an unknown name is UnknownTrainer here too
    return importlib.import_module(FUSED[name]) if name in FUSED else None


def parse_config(name: str, config: dict[str, Any]) -> BaseModel:
    """The trainer's typed Config for `config`; raises UnknownTrainer or InvalidConfig."""
    module = load(name)
    try:
        return module.Config.model_validate(config)
    except ValidationError as exc:
        errors = [
            ("config." + ".".join(str(p) for p in err["loc"]) if err["loc"] else "config", err["msg"])
            for err in exc.errors()
        ]
        raise InvalidConfig(name, errors) from None


def validate_config(name: str, config: dict[str, Any]) -> None:
    parse_config(name, config)


def external_id(name: str, config: dict[str, Any]) -> str | None:
    """The id a trainer's users know a config by outside gridfleet (seed 001's config id), or None.

    A trainer offers it as `external_id(cfg: Config) -> str`; the scheduler stores it with each job
    (jobs.external_id, searchable with GET /jobs?external_id=...)."""
    module = load(name)
    make = getattr(module, "external_id", None)
    return None if make is None else make(parse_config(name, config))


def fuse_key(name: str, config: dict[str, Any]) -> str | None:
    """The key under which jobs of one grid may be claimed as a gang and trained as one stacked model, or
    None (never fused: claimed one at a time).

    A trainer offers it as `fuse_key(cfg: Config) -> str | None`; the scheduler stores it with each job at
    submit (jobs.fuse_key, docs/gang_claims.md)."""
    module = load(name)
    make = getattr(module, "fuse_key", None)
    return None if make is None else make(parse_config(name, config))
