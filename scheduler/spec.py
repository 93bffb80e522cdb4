"""Grid specs: validation and deterministic expansion into jobs. Pure logic, no database.

A grid = trainer + base config + axes (cartesian product) + zip groups (lists advanced together)
+ seeds, minus `exclude` patterns. Axis keys may be dotted paths ("optim.lr") into nested configs.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from common.store_uri import check_store

MAX_JOBS_PER_GRID = 100_000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class GridError(ValueError):
    """A grid spec a person must fix. `field` names the offending part (e.g. 'axes.lr')."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Resources(BaseModel):
    model_config = ConfigDict(extra="allow")  # free-form extras (e.g. gpu_memory_gb) ride along
    gpus: float = Field(default=0.0, ge=0.0, le=64.0)


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_' or '-'; at most 100")
    trainer: str = Field(min_length=1, max_length=100)
    config: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    max_attempts: int = Field(default=3, ge=1, le=100)
    resources: Resources = Field(default_factory=Resources)
    code_rev: str | None = Field(default=None, min_length=4, max_length=100, pattern=r"^[A-Za-z0-9._/-]+$")
    objective: str | None = Field(default=None, pattern=r"^(min|max):[A-Za-z0-9_./-]+$")
    # Where checkpoints and results go: "local" or "hf://owner/repo[@branch]"; unset: each worker's setting.
    store: str | None = Field(default=None, max_length=300)

    @field_validator("zip", mode="before")
    @classmethod
    def _zip_as_list(cls, value):
        # `zip: {a: [...], b: [...]}` is one group; a list of such mappings is several.
        return [value] if isinstance(value, dict) else value

    @field_validator("axes")
    @classmethod
    def _axes_not_empty(cls, axes):
        for key, values in axes.items():
            if not values:
                raise ValueError(f"axis '{key}' is an empty list; give it at least one value")
        return axes

    @field_validator("store")
    @classmethod
    def _store_known(cls, store):
        return None if store is None else check_store(store)

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, seeds):
        if not seeds:
            raise ValueError("seeds is empty; leave it out for the default [0]")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds has duplicates")
        return seeds

    @field_validator("zip")
    @classmethod
    def _zip_groups_consistent(cls, groups, info: ValidationInfo):
        # A field validator (not a model validator) so the error's location names `zip`; `axes` is
        # declared first, so it is already validated here (absent when it was itself invalid).
        seen = set(info.data.get("axes") or {})
        for i, group in enumerate(groups):
            if not group:
                raise ValueError(f"zip[{i}] is empty")
            lengths = {key: len(values) for key, values in group.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"zip[{i}] lists must have equal lengths, got {lengths}")
            if 0 in lengths.values():
                raise ValueError(f"zip[{i}] lists are empty")
            for key in group:
                if key in seen:
                    raise ValueError(f"key '{key}' is swept twice (in axes and/or zip groups)")
                seen.add(key)
        return groups

    @property
    def objective_parts(self) -> tuple[str, str] | None:
        if not self.objective:
            return None
        direction, metric = self.objective.split(":", 1)
        return direction, metric

    def job_count_upper_bound(self) -> int:
        count = len(self.seeds)
        for values in self.axes.values():
            count *= len(values)
        for group in self.zip:
            count *= len(next(iter(group.values())))
        return count


@dataclass(frozen=True)
class JobSpec:
    key: str
    config: dict[str, Any]
    seed: int


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def job_key(trainer: str, config: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(canonical_json({"trainer": trainer, "config": config, "seed": seed}).encode()).hexdigest()


def _set_path(config: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = config
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise GridError(f"axes.{path}", f"'{part}' is not a mapping in the base config")
        node = child
    node[parts[-1]] = value


def _get_path(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _excluded(config: dict[str, Any], patterns: list[dict[str, Any]]) -> bool:
    return any(all(_get_path(config, k) == v for k, v in pattern.items()) for pattern in patterns)


def expand(spec: GridSpec) -> list[JobSpec]:
    """All jobs of a grid, in a deterministic order (axes in spec order, then zip groups, then seeds)."""
    bound = spec.job_count_upper_bound()
    if bound > MAX_JOBS_PER_GRID:
        raise GridError("axes", f"the grid expands to {bound:,} jobs; the limit is {MAX_JOBS_PER_GRID:,}")
    axis_items = [[(key, value) for value in values] for key, values in spec.axes.items()]
    zip_items = [
        [list(zip(group.keys(), row)) for row in zip(*group.values())] for group in spec.zip
    ]
    jobs: list[JobSpec] = []
    seen: set[str] = set()
    for combo in itertools.product(*axis_items, *zip_items):
        config = copy.deepcopy(spec.config)
        for item in combo:
            for key, value in item if isinstance(item, list) else [item]:
                _set_path(config, key, copy.deepcopy(value))
        if _excluded(config, spec.exclude):
            continue
        for seed in spec.seeds:
            try:
                key = job_key(spec.trainer, config, seed)
            except (TypeError, ValueError) as exc:
                raise GridError("config", f"values must be plain JSON (no NaN/inf): {exc}") from exc
            if key not in seen:  # duplicate axis values make duplicate jobs: keep one
                seen.add(key)
                jobs.append(JobSpec(key=key, config=config, seed=seed))
    return jobs


ConfigValidator = Callable[[str, dict[str, Any]], None]


def validate_jobs(spec: GridSpec, jobs: list[JobSpec], validate_config: ConfigValidator) -> None:
    """Check every distinct config against the trainer's Config; GridError names the first bad field."""
    checked: set[str] = set()
    for job in jobs:
        marker = canonical_json(job.config)
        if marker in checked:
            continue
        checked.add(marker)
        validate_config(spec.trainer, job.config)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
