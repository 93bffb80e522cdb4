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

    @classmethod
    def stopped(cls, root: Path, cfgs: list, seeds: list[int], stop_at: int) -> list[dict]:
        """Each config's solo run under root / m{i} (job id 10 + i) stopped at `stop_at`: its checkpoints' pointers."""
        pointers = []
        for i, cfg in enumerate(cfgs):
            first = cls(root / f"m{i}", seed=seeds[i], job_id=10 + i, stop_at=stop_at)
            assert first.run(cfg) == {"stopped_at": stop_at}
            pointers.append(first.checkpoints[-1])
        return pointers


def paired_reports(solo: harness.Harness, fused: harness.Harness, after: int = 0) -> list[tuple[dict, dict]]:
    """The solo run's reports past step `after` beside the member's, which must be at the same steps."""
    expected = [(s, r) for s, r in solo.reports if s > after]
    assert [s for s, _ in expected] == [s for s, _ in fused.reports]
    return [(a, b) for (_, a), (_, b) in zip(expected, fused.reports)]


def assert_members(same_run: Callable[..., None], solos: list, gang: Gang, results: list,
                   rows: tuple[int, ...] | None = None, **options) -> None:
    """same_run(solo, member, solo_result, member_result, **options) for the gang's members in `rows` (all
    by default), each beside its own solo run."""
    assert len(solos) >= len(gang.members) == len(results)
    for i in range(len(results)) if rows is None else rows:
        same_run(solos[i][0], gang.members[i], solos[i][1], results[i], **options)


def resumed_apart(gang: type[Gang], solo: type[Solo], tmp_path: Path, cfgs: list, seeds: list[int],
                  stop_at: int) -> tuple[list[tuple[Solo, harness.Harness, Any, Any]], Gang]:
    """Four members stopped together at `stop_at` (should_stop for all: a SIGTERM), then resumed apart: member
    0 solo from the gang's checkpoint, 1 and 2 in a new gang with 3 from scratch beside them (a gang joins
    only members at the same step, so 3 trains in its own group). Each member's uninterrupted solo run
    beside its resumed one, in assert_members' order (solo, resumed harness, solo result, resumed result),
    and the new gang."""
    first = gang(tmp_path / "gang", seeds, stop_at=[stop_at] * 4)
    assert first.train(cfgs) == [{"stopped_at": stop_at}] * 4
    pointers = [h.checkpoints[-1] for h in first.members]
    assert [p["step"] for p in pointers] == [stop_at] * 4
    alone = solo(tmp_path / "gang" / "m0", seed=seeds[0], job_id=10, checkpoint=pointers[0])
    alone_result = alone.run(cfgs[0])
    again = gang(tmp_path / "gang", seeds[1:3], checkpoints=pointers[1:3], first=1)
    again.members.append(harness.Harness(tmp_path / "fresh3", seed=seeds[3], job_id=13))
    resumed = again.train(cfgs[1:])
    straight = solo.runs(tmp_path, cfgs, seeds)
    return [(s, h, s_result, result) for (s, s_result), (h, result)
            in zip(straight, [(alone, alone_result), *zip(again.members, resumed)])], again


def unreadable_first(gang: type[Gang], solo: type[Solo], tmp_path: Path, cfgs: list, seeds: list[int],
                     step: int) -> tuple[Solo, harness.Harness, Any, Any]:
    """A gang of two whose first member's checkpoint pointer names a file that is gone: that member fails
    alone (FileNotFoundError, nothing reported). The second member beside its solo run, in assert_members'
    order: solo harness, member harness, solo result, member result."""
    missing = {"uri": f"local:grid-1/job-10/step-{step}.pt", "step": step}
    two = gang(tmp_path / "gang", seeds[:2], checkpoints=[missing, None])
    results = two.train(cfgs[:2])
    assert isinstance(results[0], FileNotFoundError) and two.members[0].reports == []
    (alone, alone_result), = solo.runs(tmp_path, cfgs[1:2], seeds[1:2])
    return alone, two.members[1], alone_result, results[1]


def fail_reports(h: harness.Harness, from_step: int) -> None:
    """Member h's reports fail from `from_step` on, as when its pipe to the agent has closed."""
    real_report = h.ctx.report

    def report(step, **metrics):
        if step >= from_step:
            raise ConnectionError("pipe to the agent closed")
        real_report(step, **metrics)

    h.ctx.report = report
