"""Request bodies. Bounds match the database columns (Postgres INTEGER is 32-bit, VARCHAR(n) is
checked, text may not hold NUL), so a bad value is a 422 naming the field, never a database error.

What a string may hold is decided per field by common/json_checks.py: identifiers and exact JSON
(`Short`, `ExactJson`: names, resources, pointers) refuse NUL and lone surrogates with a 422; free text
and a trainer's numbers (`Text`, metric values, results) have them replaced by U+FFFD, and the heartbeat
and finish say which fields they repaired (`cleaned`), so one odd value never fails a job's heartbeat.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StringConstraints, \
    ValidationInfo, field_validator, model_validator

from common.json_checks import BadValue, check, clean_text, cleaned, is_plain, text_problem
from scheduler.spec import GridSpec

INT32_MAX = 2**31 - 1
MAX_TEXT = 65_536
GANG_LIMIT = 1024  # the bound of Settings.max_gang_jobs; the route checks the configured one


# Before pydantic's own str check, which refuses a lone surrogate with "unable to parse raw data as a
# unicode string" and names no reason; these say what is wrong, or repair free text first.
def _exact_text(value: Any) -> Any:
    problem = text_problem(value) if isinstance(value, str) else None
    if problem:
        raise ValueError(problem)
    return value


def _clean_text(value: Any) -> Any:
    return clean_text(value)[0] if isinstance(value, str) else value


def _tail(value: str) -> str:
    """Free text from a worker (errors, log lines): keep the tail of very long text."""
    if len(value) > MAX_TEXT:
        value = "...(truncated)\n" + value[-(MAX_TEXT - 16):]
    return value


def _exact_json(value: Any, info: ValidationInfo) -> Any:
    try:
        return check(value, info.field_name or "")
    except BadValue as exc:
        raise ValueError(exc.under(info.field_name)) from None


def Short(max_length: int, min_length: int = 1):  # noqa: N802 - a type factory
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length),
                     BeforeValidator(_exact_text)]


Text = Annotated[str, BeforeValidator(_clean_text), AfterValidator(_tail)]
ExactJson = Annotated[dict[str, Any], BeforeValidator(_exact_json)]
Id = Annotated[int, Field(ge=1, le=INT32_MAX)]
Step = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
AttemptId = Short(64)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegisterWorker(Body):
    name: Short(200)
    host: Short(200)
    gpus: Annotated[list[Any], BeforeValidator(_exact_json)] = Field(default_factory=list, max_length=256)
    trainers: list[Short(100)] = Field(default_factory=list, max_length=1000)
    resources: ExactJson = Field(default_factory=dict)
    code_rev: Short(100) | None = None


class Claim(Body):
    trainers: list[Short(100)] | None = Field(default=None, max_length=1000)
    gpus: float = Field(default=0.0, ge=0.0, le=1_000_000.0)
    can_pin_code: bool = False
    code_rev: Short(100) | None = None
    grid_id: Id | None = None  # only this grid's jobs (e.g. a worker dedicated to one grid)
    # Up to this many jobs of one grid sharing a fuse key (a gang, docs/gang_claims.md); at most the server's
    # max_gang_jobs setting. 1: today's single claim.
    max_jobs: int = Field(default=1, ge=1, le=GANG_LIMIT)


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
    _cleaned: list[str] = PrivateAttr(default_factory=list)  # metric fields repaired (json_checks.cleaned)

    @model_validator(mode="wrap")
    @classmethod
    def _clean_metrics(cls, data: Any, handler):
        repaired: list[str] = []
        if isinstance(data, dict) and isinstance(data.get("metrics"), list) and not is_plain(data["metrics"]):
            data = {**data, "metrics": [_clean_member(m, "values", f"metrics.{i}", repaired)
                                        for i, m in enumerate(data["metrics"])]}
        body = handler(data)
        body._cleaned = repaired
        return body


def _clean_member(data: Any, key: str, field: str, repaired: list[str]) -> Any:
    """`data` with data[key] repaired by json_checks.cleaned (the paths it changed go to `repaired`)."""
    if not isinstance(data, dict) or key not in data:
        return data
    try:
        value, changed = cleaned(data[key], f"{field}.{key}" if field else key)
    except BadValue as exc:
        raise ValueError(exc.under()) from None
    repaired += changed
    return {**data, key: value} if changed else data


class Checkpoint(Fenced):
    pointer: ExactJson

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
    outcome: Literal["succeeded", "error", "preempted", "cancelled", "pruned"]
    result: dict[str, Any] | None = None
    error: Text | None = None
    _cleaned: list[str] = PrivateAttr(default_factory=list)  # result fields repaired (json_checks.cleaned)

    @model_validator(mode="wrap")
    @classmethod
    def _clean_result(cls, data: Any, handler):
        repaired: list[str] = []
        body = handler(_clean_member(data, "result", "", repaired))
        body._cleaned = repaired
        return body


class CodeRev(Fenced):
    """The full commit sha an attempt really runs (a pinned job's code_rev, resolved by the worker)."""
    code_rev: Annotated[str, StringConstraints(pattern=r"^([0-9a-f]{40}|[0-9a-f]{64})$")]


class WorkerEvent(Body):
    """Something that happened to the worker outside any job (e.g. a self-update rolled back)."""
    kind: Short(40)
    message: Text = ""
    resources: ExactJson | None = None  # replaces the registered resources when given


class DoneJob(Body):
    """A job of the grid that already ran elsewhere: its config and seed (as the grid expands them), its
    result and, when known, when it started and ended (unix seconds)."""
    config: ExactJson
    seed: Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]
    result: ExactJson
    started_at: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    finished_at: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class ImportGrid(Body):
    """POST /grids/import (`gridfleet import`): the grid, and those of its jobs that need no training."""
    grid: GridSpec
    done: list[DoneJob] = Field(default_factory=list, max_length=100_000)


class MemberHeartbeat(Heartbeat):
    """One gang member's heartbeat: as a single heartbeat, for one job of the gang."""
    job_id: Id
    attempt_id: AttemptId


class GangHeartbeat(Body):
    members: list[MemberHeartbeat] = Field(min_length=1, max_length=GANG_LIMIT)


class GangFinish(Body):
    members: list[Finish] = Field(min_length=1, max_length=GANG_LIMIT)
