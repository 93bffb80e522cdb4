"""objective: a known function of the config, for searches (docs/searches.md). No training: the result's `loss`
is the function's value at (x, y), so a test or a demo knows the optimum a sampler should find.

`quadratic`: (x - 1.5)^2 + (y + 2.5)^2 + offset, minimum `offset` at (1.5, -2.5). `branin`: the Branin-Hoo
function (minimum 0.397887 at (-pi, 12.275), (pi, 2.275) and (9.42478, 2.475); usual domain x in [-5, 10],
y in [0, 15]). `kind` and `level` are a categorical and an int knob: "flat" adds nothing, "bump" adds 1;
`level` adds 0.25 * (level - 2)^2, so searches over every parameter type have a known best. `seconds`: how
long a trial takes (0: instant), for tests that interrupt a search while its trials run.
"""
from __future__ import annotations

import math
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    function: Literal["quadratic", "branin"] = "quadratic"
    x: float = Field(default=0.0, ge=-1e6, le=1e6)
    y: float = Field(default=0.0, ge=-1e6, le=1e6)
    kind: Literal["flat", "bump"] = "flat"
    level: int = Field(default=2, ge=-1000, le=1000)
    offset: float = 0.0
    seconds: float = Field(default=0.0, ge=0.0, le=3600.0)


def value(config: Config) -> float:
    if config.function == "quadratic":
        base = (config.x - 1.5) ** 2 + (config.y + 2.5) ** 2
    else:
        b, c, r, s, tt = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 6.0, 10.0, 1 / (8 * math.pi)
        base = (config.y - b * config.x ** 2 + c * config.x - r) ** 2 + s * (1 - tt) * math.cos(config.x) + s
    return base + (1.0 if config.kind == "bump" else 0.0) + 0.25 * (config.level - 2) ** 2 + config.offset


def train(config: Config, ctx) -> dict:
    loss = value(config)
    end = time.monotonic() + config.seconds
    while time.monotonic() < end:  # a slow trial stops when asked (SIGTERM, cancel), then runs again whole
        if ctx.should_stop():
            return {"stopped": True}  # the runner sees the stop it asked for: the job is released, not done
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    ctx.report(0, loss=loss)
    return {"loss": loss}
