"""noop: finishes at once. For tests and queue benchmarks."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float = 0.0  # echoed back as the result's `loss`, so grids have something to rank
    # Jobs with the same group share a fuse key, so gang claims can be tested and benched; None: never fused.
    fuse_group: str | None = Field(default=None, min_length=1, max_length=100)


def train(config: Config, ctx) -> dict:
    ctx.report(0, loss=config.value)
    return {"loss": config.value}


def fuse_key(config: Config) -> str | None:
    return None if config.fuse_group is None else f"noop:{config.fuse_group}"
