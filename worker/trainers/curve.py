"""curve: a trainer whose loss curve is a known function of its config, for tests and benchmarks of early
stopping and searches (docs/early_stopping.md).

    final(config)      = (x - x_opt)^2 + (y - y_opt)^2
    loss(config, step) = final(config) + 1 / (1 + step / tau)

Every config's curve falls the same way, so configs rank by `final` at every step (the best config is best
at every rung). It reports `loss` every `report_every` steps, checkpoints every `checkpoint_every` steps,
resumes from its checkpoint (the result says from which step) and sleeps `step_seconds` a step.

It also trains gangs (`train_many`, named in trainers.FUSED; configs with the same `fuse_group` share a fuse
key), so early stopping of gang members is tested with real processes (tests/e2e/test_gang_pruning.py):
members step in lockstep, each from its own checkpointed step, and a member told to stop (a cancel, a
prune) checkpoints and leaves while the others go on. A member's reports, checkpoints and result are
exactly its solo run's.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field

from worker.trainers import gangs


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: float = Field(default=0.0, ge=-1e6, le=1e6)
    y: float = Field(default=0.0, ge=-1e6, le=1e6)
    x_opt: float = Field(default=0.3, ge=-1e6, le=1e6)
    y_opt: float = Field(default=-0.2, ge=-1e6, le=1e6)
    tau: float = Field(default=5.0, gt=0.0, le=1e9)
    steps: int = Field(default=30, ge=1, le=10_000_000)
    report_every: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=1, ge=1)
    step_seconds: float = Field(default=0.0, ge=0.0, le=60.0)
    # Jobs with the same group share a fuse key and are claimed as gangs; None (the default): never fused.
    fuse_group: str | None = Field(default=None, min_length=1, max_length=100)


def fuse_key(config: Config) -> str | None:
    return None if config.fuse_group is None else f"curve:{config.fuse_group}"


def final(config: Config) -> float:
    return (config.x - config.x_opt) ** 2 + (config.y - config.y_opt) ** 2


def loss_at(config: Config, step: int) -> float:
    return final(config) + 1.0 / (1.0 + step / config.tau)


def train(config: Config, ctx) -> dict:
    resumed_from = _start(ctx)
    for step in range(resumed_from, config.steps):
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step})
            return {"stopped_at": step}
        if config.step_seconds:
            time.sleep(config.step_seconds)
        _step(config, ctx, step)
    return _result(config, resumed_from)


def train_many(configs: list[Config], ctxs: list) -> list[dict | Exception]:
    """One step of every member per tick (one sleep for all: the point of a gang), each from its own step;
    a member leaves (`ctx.leave`) the moment it is done, stopped or failed, and the others go on."""
    starts: list[int] = [0] * len(configs)
    outcome: list[dict | Exception | None] = [None] * len(configs)
    for i, ctx in enumerate(ctxs):
        try:
            starts[i] = _start(ctx)
        except Exception as exc:  # noqa: BLE001 - e.g. its checkpoint is gone: this member fails alone
            outcome[i] = gangs.leave(ctx, exc)
    steps = list(starts)
    active = [i for i in range(len(configs)) if outcome[i] is None]

    def ask(i: int) -> dict | None:  # first, as train does before each step: a stop costs no step
        if steps[i] >= configs[i].steps:  # resumed from its last step: nothing left to train (as train)
            return _result(configs[i], starts[i])
        if ctxs[i].should_stop():
            ctxs[i].save_checkpoint({"step": steps[i]})
            return {"stopped_at": steps[i]}
        return None

    def advance(i: int) -> dict | None:
        _step(configs[i], ctxs[i], steps[i])
        steps[i] += 1
        return _result(configs[i], starts[i]) if steps[i] >= configs[i].steps else None

    while active:
        gangs.lockstep(active, outcome, ctxs, ask)
        if not active:
            break
        pause = max(configs[i].step_seconds for i in active)
        if pause:
            time.sleep(pause)
        gangs.lockstep(active, outcome, ctxs, advance)
    return outcome


def _start(ctx) -> int:
    return (ctx.load_checkpoint() or {"step": 0})["step"]


def _step(config: Config, ctx, step: int) -> None:
    done = step + 1
    if done % config.report_every == 0 or done == config.steps:
        ctx.report(done, loss=loss_at(config, done))
        ctx.progress(done, config.steps)
    if done % config.checkpoint_every == 0 or done == config.steps:
        ctx.save_checkpoint({"step": done})


def _result(config: Config, resumed_from: int) -> dict:
    return {"loss": loss_at(config, config.steps), "final": final(config), "steps": config.steps,
            "resumed_from": resumed_from}


