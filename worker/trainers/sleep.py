"""sleep: pretends to train for `seconds`, in `steps` steps, checkpointing as it goes. For tests."""
from __future__ import annotations

import os
import signal
import time

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(default=1.0, ge=0.0, le=86_400.0)
    steps: int = Field(default=10, ge=1, le=1_000_000)
    checkpoint_every: int = Field(default=1, ge=1)
    fail_at_step: int | None = None  # raise at this step, to test retries
    segfault_at_step: int | None = None  # die of SIGSEGV at this step, to test that a crash ends only its job


def train(config: Config, ctx) -> dict:
    state = ctx.load_checkpoint() or {"step": 0}
    for step in range(state["step"], config.steps):
        if ctx.should_stop():
            ctx.save_checkpoint({"step": step})
            return {"stopped_at": step}
        if config.fail_at_step is not None and step == config.fail_at_step:
            raise RuntimeError(f"sleep trainer asked to fail at step {step}")
        if config.segfault_at_step is not None and step == config.segfault_at_step:
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(config.seconds / config.steps)
        loss = 1.0 / (step + 1)
        ctx.report(step + 1, loss=loss)
        ctx.progress(step + 1, config.steps)
        if (step + 1) % config.checkpoint_every == 0:
            ctx.save_checkpoint({"step": step + 1})
    return {"loss": 1.0 / config.steps, "steps": config.steps}
