"""curve: a trainer whose loss curve is a known function of its config, for tests and benchmarks of early
stopping and searches (docs/early_stopping.md).

    final(config)      = (x - x_opt)^2 + (y - y_opt)^2
    loss(config, step) = final(config) + 1 / (1 + step / tau)

Every config's curve falls the same way, so configs rank by `final` at every step (the best config is best
at every rung). It reports `loss` every `report_every` steps, checkpoints every `checkpoint_every` steps,
resumes from its checkpoint (the result says from which step) and sleeps `step_seconds` a step.
"""
from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field


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


def final(config: Config) -> float:
    return (config.x - config.x_opt) ** 2 + (config.y - config.y_opt) ** 2


def loss_at(config: Config, step: int) -> float:
    return final(config) + 1.0 / (1.0 + step / config.tau)


def train(config: Config, ctx) -> dict:
    state = ctx.load_checkpoint() or {"step": 0}
    resumed_from = state["step"]
    for step in range(resumed_from, config.steps):
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step})
            return {"stopped_at": step}
        if config.step_seconds:
            time.sleep(config.step_seconds)
        done = step + 1
        if done % config.report_every == 0 or done == config.steps:
            ctx.report(done, loss=loss_at(config, done))
            ctx.progress(done, config.steps)
        if done % config.checkpoint_every == 0 or done == config.steps:
            ctx.save_checkpoint({"step": done})
    return {"loss": loss_at(config, config.steps), "final": final(config), "steps": config.steps,
            "resumed_from": resumed_from}
