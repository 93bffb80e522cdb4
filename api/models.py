"""Request bodies. Bounds match the database columns (Postgres INTEGER is 32-bit, VARCHAR(n) is
checked, text may not hold NUL), so a bad value is a 422 naming the field, never a database error."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

INT32_MAX = 2**31 - 1
MAX_TEXT = 65_536


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _text(value: str) -> str:
    """Free text from a worker (errors, log lines): strip NUL, keep the tail of very long text."""
    value = value.replace("\x00", "")
    if len(value) > MAX_TEXT:
        value = "...(truncated)\n" + value[-(MAX_TEXT - 16):]
    return value


def Short(max_length: int, min_length: int = 1):  # noqa: N802 - a type factory
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length), AfterValidator(_no_nul)]


Text = Annotated[str, AfterValidator(_text)]
Id = Annotated[int, Field(ge=1, le=INT32_MAX)]
Step = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
AttemptId = Short(64)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterWorker(Body):
    name: Short(200)
    host: Short(200)
    gpus: list[Any] = Field(default_factory=list, max_length=256)
    trainers: list[Short(100)] = Field(default_factory=list, max_length=1000)
    resources: dict[str, Any] = Field(default_factory=dict)
    code_rev: Short(100) | None = None


class Claim(Body):
    trainers: list[Short(100)] | None = Field(default=None, max_length=1000)
    gpus: float = Field(default=0.0, ge=0.0, le=1_000_000.0)
    can_pin_code: bool = False
    code_rev: Short(100) | None = None
    grid_id: Id | None = None  # only this grid's jobs (e.g. a worker dedicated to one grid)


class MetricIn(Body):
    step: Step
    time: float | None = None
    values: dict[str, Any] = Field(default_factory=dict)


class EventIn(Body):
    kind: Short(40)
    message: Text = ""


class Fenced(Body):
    job_id: Id
    attempt_id: AttemptId


class Heartbeat(Body):
    job_id: Id | None = None
    attempt_id: AttemptId | None = None
    step: Step | None = None
    progress: tuple[float, float] | None = None
    metrics: list[MetricIn] = Field(default_factory=list, max_length=10_000)
    events: list[EventIn] = Field(default_factory=list, max_length=1_000)


class Checkpoint(Fenced):
    pointer: dict[str, Any]

    @field_validator("pointer")
    @classmethod
    def _step_fits(cls, pointer):
        step = pointer.get("step")
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, int) or not -INT32_MAX - 1 <= step <= INT32_MAX
        ):
            raise ValueError("pointer.step must be an integer between -2^31 and 2^31-1, or absent")
        return pointer


class Events(Fenced):
    events: list[EventIn] = Field(max_length=1_000)


class Finish(Fenced):
    outcome: Literal["succeeded", "error", "preempted", "cancelled"]
    result: dict[str, Any] | None = None
    error: Text | None = None


class CodeRev(Fenced):
    """The full commit sha an attempt really runs (a pinned job's code_rev, resolved by the worker)."""
    code_rev: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{40}|[0-9a-f]{64})$")]


class WorkerEvent(Body):
    """Something that happened to the worker outside any job (e.g. a self-update rolled back)."""
    kind: Short(40)
    message: Text = ""
    resources: dict[str, Any] | None = None  # replaces the registered resources when given
