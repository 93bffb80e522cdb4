"""The fused tests' members: a Gang of harnesses (one context, pipe and store per member, as the agent gives
each job of a gang its own) trained by a trainer's `train_many`, and the Solo runs they are compared to.

A test file names its trainer once:

    Gang = fused_harness.Gang.for_trainer("perturbation")  # trainers.load_fused("perturbation").train_many
    Solo = fused_harness.Solo.for_trainer(perturbation.train, returns=(perturbation.Diverged,))
    solo_runs = Solo.runs

(`returns`: what a solo run raises that the test compares as its result, e.g. a diverged run.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import harness  # tests/trainers/harness.py

from worker import trainers


class Gang:
    """Member i is a Harness under root / names[i] (default m{first + i}), seed seeds[i], job id 10 + first + i."""

    trainer: ClassVar[str]

    def __init__(self, root: Path, seeds: list[int], stop_at: list | None = None, checkpoints: list | None = None,
                 names: list[str] | None = None, first: int = 0):
        names = names or [f"m{first + i}" for i in range(len(seeds))]
        self.members = [harness.Harness(root / name, seed=seed, job_id=10 + first + i,
                                        stop_at=None if stop_at is None else stop_at[i],
                                        checkpoint=None if checkpoints is None else checkpoints[i])
                        for i, (name, seed) in enumerate(zip(names, seeds))]

    @classmethod
    def for_trainer(cls, trainer: str) -> type["Gang"]:
        return type(f"Gang[{trainer}]", (cls,), {"trainer": trainer})

    def train(self, cfgs: list) -> list:
        try:
            return trainers.load_fused(self.trainer).train_many(cfgs, [h.ctx for h in self.members])
        finally:
            for h in self.members:
                h.close()


class Solo(harness.Harness):
    """One solo run of `train(cfg, ctx)` on a validated config."""

    train: ClassVar[Callable[[Any, Any], dict]]
    returns: ClassVar[tuple[type[Exception], ...]] = ()

    def run(self, cfg) -> Any:
        try:
            return self.train(cfg, self.ctx)
        except self.returns as exc:
            return exc
        finally:
            self.close()

    @classmethod
    def for_trainer(cls, train: Callable[[Any, Any], dict],
                    returns: tuple[type[Exception], ...] = ()) -> type["Solo"]:
        return type(f"Solo[{train.__module__}]", (cls,), {"train": staticmethod(train), "returns": returns})

    @classmethod
    def runs(cls, tmp_path: Path, cfgs: list, seeds: list[int]) -> list[tuple["Solo", Any]]:
        """Each config's solo run (seed seeds[i], job id 10 + i, under tmp_path / solo{i}) and its result."""
        out = []
        for i, (cfg, seed) in enumerate(zip(cfgs, seeds)):
            h = cls(tmp_path / f"solo{i}", seed=seed, job_id=10 + i)
            out.append((h, h.run(cfg)))
        return out
