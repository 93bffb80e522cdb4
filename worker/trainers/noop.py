"""noop: finishes at once (the default), or counts `steps` steps. For tests and queue benchmarks.

It also trains gangs (`train_many`, named in trainers.FUSED), so the agent's gang path (worker/gang_run.py)
is tested without torch: members step in lockstep, each from its own checkpointed step, and a member that
fails, turns NaN or is told to stop leaves while the others go on. A member's reports, checkpoints and
result are exactly its solo run's.
"""
from __future__ import annotations

import math
import os
import signal
import time

from pydantic import BaseModel, ConfigDict, Field

from worker.trainers import gangs


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float = 0.0  # echoed back as the result's `loss`, so grids have something to rank
    # Jobs with the same group share a fuse key, so gang claims can be tested and benched; None: never fused.
    fuse_group: str | None = Field(default=None, min_length=1, max_length=100)
    # 0: report once and finish at once (as noop always did). Otherwise this many steps, `seconds` in all.
    steps: int = Field(default=0, ge=0, le=1_000_000)
    seconds: float = Field(default=0.0, ge=0.0, le=86_400.0)
    checkpoint_every: int = Field(default=1, ge=1)
    fail_at_step: int | None = None  # raise at this step
    nan_at_step: int | None = None  # report a NaN loss at this step, then raise (as a diverged model does)
    segfault_at_step: int | None = None  # die of SIGSEGV at this step (the whole process: a gang's child too)


class Diverged(ArithmeticError):
    pass


def fuse_key(config: Config) -> str | None:
    return None if config.fuse_group is None else f"noop:{config.fuse_group}"


def train(config: Config, ctx) -> dict:
    if config.steps == 0:
        ctx.report(0, loss=config.value)
        return {"loss": config.value}
    state = ctx.load_checkpoint() or {"step": 0}
    for step in range(state["step"], config.steps):
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step})
            return {"stopped_at": step}
        time.sleep(config.seconds / config.steps)
        _step(config, ctx, step)
    return _result(config)


def train_many(configs: list[Config], ctxs: list) -> list[dict | Exception]:
    """One step of every member per tick (one sleep for all: the point of a gang), each from its own step."""
    steps = [None if c.steps == 0 else (ctx.load_checkpoint() or {"step": 0})["step"] for c, ctx in zip(configs, ctxs)]
    outcome: list[dict | Exception | None] = [None] * len(configs)
    for i, (config, ctx) in enumerate(zip(configs, ctxs)):
        if steps[i] is None:  # the finish-at-once kind
            ctx.report(0, loss=config.value)
            outcome[i] = gangs.leave(ctx, {"loss": config.value})
    active = [i for i in range(len(configs)) if outcome[i] is None]

    def tick(i: int) -> dict | None:
        config, ctx, step = configs[i], ctxs[i], steps[i]
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step})
            return {"stopped_at": step}
        if step >= config.steps:
            return _result(config)
        _step(config, ctx, step)
        steps[i] = step + 1
        return _result(config) if steps[i] >= config.steps else None

    while active:
        time.sleep(max(configs[i].seconds / configs[i].steps for i in active))
        gangs.lockstep(active, outcome, ctxs, tick)
    return outcome


def _step(config: Config, ctx, step: int) -> None:
    if config.fail_at_step == step:
        raise RuntimeError(f"noop trainer asked to fail at step {step}")
    if config.segfault_at_step == step:
        os.kill(os.getpid(), signal.SIGSEGV)
    loss = math.nan if config.nan_at_step == step else config.value / (step + 1)
    ctx.report(step + 1, loss=loss)
    ctx.progress(step + 1, config.steps)
    if math.isnan(loss):
        raise Diverged(f"loss is NaN at step {step + 1}")
    if (step + 1) % config.checkpoint_every == 0:
        ctx.save_checkpoint({"step": step + 1})


def _result(config: Config) -> dict:
    return {"loss": config.value / config.steps, "steps": config.steps}


