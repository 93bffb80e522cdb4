"""noop: finishes at once. For tests and queue benchmarks."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float = 0.0  # echoed back as the result's `loss`, so grids have something to rank


def train(config: Config, ctx) -> dict:
    ctx.report(0, loss=config.value)
    return {"loss": config.value}
