"""Grid specs: validation and deterministic expansion into jobs. Pure logic, no database.

A grid = trainer + base config + axes (cartesian product) + zip groups (lists advanced together)
+ sample draws + seeds, minus `exclude` patterns. Axis keys may be dotted paths ("optim.lr") into nested
configs; a numeric part indexes an existing list ("block_types.1.0").

`sample` (seed 000's random-network runners): n draws of `params`, each a distribution, advanced together
like a zip group. Draw i of key k comes from its own generator seeded by sha256(seed, i, k), so the
same spec always expands to the same configs (and job keys), and adding a key leaves the others' draws.

`search` (docs/searches.md): a sampler asks for configs as results come in (scheduler/search.py). Here only
its spec, `SearchSpec`: with a search, `expand` gives the *points* (each axis point and seed), and each
point gets its own search of `n_trials` trials over `space`.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from common.json_checks import BadValue, check
from common.store_uri import check_store

MAX_JOBS_PER_GRID = 100_000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class GridError(ValueError):
    """A grid spec a person must fix. `field` names the offending part (e.g. 'axes.lr')."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Distribution(BaseModel):
    """One sampled value: exactly one of uniform [a, b], uniform_int [a, b] (both ends included),
    normal [mu, sigma], log_uniform [a, b] (a > 0), choice [values...], or template "G={mean},{std}" with
    `fields` (a distribution per name). Then, in order: abs, clip [lo, hi] (null: open), round (digits),
    format ("R={}")."""

    model_config = ConfigDict(extra="forbid")

    uniform: tuple[float, float] | None = None
    uniform_int: tuple[int, int] | None = None
    normal: tuple[float, float] | None = None
    log_uniform: tuple[float, float] | None = None
    choice: list[Any] | None = None
    template: str | None = None
    fields: dict[str, "Distribution"] | None = None
    abs: bool = False
    clip: tuple[float | None, float | None] | None = None
    round: int | None = Field(default=None, ge=0, le=15)
    format: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("uniform", "uniform_int", "normal", "log_uniform", "choice", "template")
                 if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of uniform, uniform_int, normal, log_uniform, choice, template"
                             f" (got {kinds or 'none'})")
        lo_hi = self.uniform or self.uniform_int or self.log_uniform
        if lo_hi is not None and lo_hi[0] > lo_hi[1]:
            raise ValueError(f"{kinds[0]} needs low <= high, got {list(lo_hi)}")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError("log_uniform needs 0 < low")
        if self.normal is not None and self.normal[1] < 0:
            raise ValueError("normal needs sigma >= 0")
        if self.choice is not None and not self.choice:
            raise ValueError("choice is empty")
        if (self.template is None) != (self.fields is None):
            raise ValueError("template and fields go together")
        if self.template is not None:
            try:
                self.template.format(**dict.fromkeys(self.fields or {}, 0))
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template '{self.template}' does not fit its fields: {exc}") from None
        if self.format is not None and "{}" not in self.format:
            raise ValueError("format needs a '{}' where the value goes")
        return self

    def draw(self, rng: random.Random) -> Any:
        u = rng.random()  # random() is the one stream Python guarantees across versions; build the rest on it
        if self.uniform is not None:
            value: Any = self.uniform[0] + (self.uniform[1] - self.uniform[0]) * u
        elif self.uniform_int is not None:
            low, high = self.uniform_int
            value = min(high, low + int(u * (high - low + 1)))
        elif self.log_uniform is not None:
            low, high = math.log(self.log_uniform[0]), math.log(self.log_uniform[1])
            value = math.exp(low + (high - low) * u)
        elif self.normal is not None:  # Box-Muller
            z = math.sqrt(-2.0 * math.log(1.0 - u)) * math.cos(2.0 * math.pi * rng.random())
            value = self.normal[0] + self.normal[1] * z
        elif self.choice is not None:
            value = copy.deepcopy(self.choice[min(len(self.choice) - 1, int(u * len(self.choice)))])
        else:
            value = self.template.format(**{name: dist.draw(rng) for name, dist in (self.fields or {}).items()})
        if is_number(value):
            if self.abs:
                value = abs(value)
            if self.clip is not None:
                low, high = self.clip
                value = value if low is None else max(low, value)
                value = value if high is None else min(high, value)
            if self.round is not None:
                value = round(value, self.round)
        return self.format.format(value) if self.format is not None else value


class SampleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1, le=MAX_JOBS_PER_GRID)
    seed: int = 0
    params: dict[str, Distribution] = Field(min_length=1)

    def rows(self) -> list[list[tuple[str, Any]]]:
        """n rows of (key, value), deterministic in (seed, draw, key)."""
        out = []
        for i in range(self.n):
            row = []
            for key, dist in self.params.items():
                digest = hashlib.sha256(f"{self.seed}:{i}:{key}".encode()).digest()
                row.append((key, dist.draw(random.Random(int.from_bytes(digest[:8], "big")))))
            out.append(row)
        return out


SEARCH_SAMPLERS = ("tpe", "random", "cmaes", "grid")
MAX_TRIALS = 10_000
MAX_GRID_POINTS = 1_000_000  # past this a finite space is treated as unbounded (no exhaustion check)
METRIC_PATTERN = r"^[A-Za-z0-9_./-]{1,100}$"


class SearchParam(BaseModel):
    """One searched key: float or int in [low, high] (log scale, or a step), or categorical `choices`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("a categorical parameter takes only `choices` (no low, high, step or log)")
            for value in self.choices:
                if value is not None and not isinstance(value, (bool, int, float, str)) or \
                        isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"choices must be null, booleans, numbers or strings; got {value!r}")
            if len({canonical_json(v) for v in self.choices}) != len(self.choices):
                raise ValueError("choices has duplicates")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} parameter needs both low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"needs finite low <= high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs 0 < low")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and (abs(value) > 2**53 or value != int(value)):
                    raise ValueError(f"an int parameter needs a whole {name} of at most 2**53, got {value}")
        return self

    def values(self) -> list[Any] | None:
        """Every value the parameter can take when there are finitely many (categorical, int, stepped float)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "float" and self.step is None:
            return None
        step = self.step or 1
        span = (self.high - self.low) / step  # may overflow to inf for extreme bounds: then unbounded
        if not math.isfinite(span) or span >= MAX_GRID_POINTS:
            return None
        count = int(math.floor(span + 1e-9)) + 1
        if self.type == "int":
            return [int(self.low) + i * int(step) for i in range(count)]
        return [self.low + i * step for i in range(count)]

    def probes(self) -> list[Any]:
        """Values worth validating against the trainer's Config at POST: the ends, or every choice."""
        if self.type == "categorical":
            return list(self.choices or [])
        ends = [self.low, self.high]
        return [int(v) for v in ends] if self.type == "int" else ends


class SearchSpec(BaseModel):
    """`search:` of a grid. `metric`/`direction` default to the grid's `objective` ("min:loss")."""

    model_config = ConfigDict(extra="forbid")

    sampler: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    n_trials: int = Field(ge=1, le=MAX_TRIALS)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    metric: str | None = Field(default=None, pattern=METRIC_PATTERN)
    direction: Literal["minimize", "maximize"] | None = None
    space: dict[str, SearchParam] = Field(min_length=1, max_length=100)
    # Trials in flight at once per point; None: as many as workers were seen in the last minute (at least 1).
    parallel: int | None = Field(default=None, ge=1, le=1024)
    constant_liar: bool = True  # tpe: running trials count as bad results, so parallel asks spread out
    startup_trials: int | None = Field(default=None, ge=0, le=MAX_TRIALS)  # tpe/cmaes: random trials first

    @field_validator("space")
    @classmethod
    def _keys(cls, space):
        for key in space:
            if not key or len(key) > 200 or any(part == "" for part in key.split(".")):
                raise ValueError(f"'{key}' is not a config key (dotted path, at most 200 characters)")
        return space

    @model_validator(mode="after")
    def _sampler_fits_space(self):
        for key, param in self.space.items():
            if self.sampler == "cmaes" and param.type == "categorical":
                raise ValueError(f"space.{key}: cmaes searches float and int parameters only; "
                                 "use tpe or random for categorical ones")
            if self.sampler == "grid" and param.values() is None:
                raise ValueError(f"space.{key}: the grid sampler needs finitely many values "
                                 "(categorical, int, or float with a step)")
        size = self.space_size()
        if size is not None and self.n_trials > size:
            raise ValueError(f"n_trials: the space has only {size} distinct configs; n_trials is {self.n_trials}")
        return self

    def space_size(self) -> int | None:
        """The number of distinct points in the space, or None when it is unbounded."""
        size = 1
        for param in self.space.values():
            values = param.values()
            if values is None:
                return None
            size *= len(values)
            if size > MAX_GRID_POINTS:
                return None
        return size


class Resources(BaseModel):
    model_config = ConfigDict(extra="allow")  # free-form extras (e.g. gpu_memory_gb) ride along
    gpus: float = Field(default=0.0, ge=0.0, le=64.0)


class PruneSpec(BaseModel):
    """Early stopping (docs/early_stopping.md; decided by scheduler/pruning.py with Optuna's pruners).

    `metric`/`mode` default to the grid's objective. `min_steps` is the grace: no decision before it (ASHA's
    min_resource and the median rule's warm-up default to it). A metric name cannot be checked ahead: a rule
    on a metric the trainer never reports never prunes."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["asha", "hyperband", "median", "threshold"]
    metric: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_./-]{1,200}$")
    mode: Literal["min", "max"] | None = None
    min_steps: int = Field(default=1, ge=1, le=1_000_000_000)
    # asha (Optuna's SuccessiveHalvingPruner): rung k is at min_resource * reduction_factor ** (k + rate);
    # hyperband (Optuna's HyperbandPruner): ASHA brackets b = 0, 1, ... (rate b), max_resource required
    reduction_factor: int = Field(default=3, ge=2, le=100)
    min_resource: int | None = Field(default=None, ge=1, le=1_000_000_000)
    max_resource: int | None = Field(default=None, ge=1, le=1_000_000_000)
    min_early_stopping_rate: int = Field(default=0, ge=0, le=30)
    bootstrap_count: int = Field(default=0, ge=0, le=100_000)
    # median (Optuna's MedianPruner): against succeeded jobs' values at the same step
    n_startup_trials: int = Field(default=5, ge=0, le=100_000)
    n_warmup_steps: int | None = Field(default=None, ge=0, le=1_000_000_000)
    interval_steps: int = Field(default=1, ge=1, le=1_000_000_000)
    n_min_trials: int = Field(default=1, ge=1, le=100_000)
    # threshold (Optuna's ThresholdPruner): outside [lower, upper] is pruned
    lower: float | None = Field(default=None, allow_inf_nan=False)
    upper: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _fits_rule(self):
        if self.rule == "threshold":
            if self.lower is None and self.upper is None:
                raise ValueError("lower/upper: the threshold rule needs lower and/or upper")
            if self.lower is not None and self.upper is not None and self.lower > self.upper:
                raise ValueError(f"lower: {self.lower} must not be above upper ({self.upper})")
        else:
            for name in ("lower", "upper"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: for the threshold rule only (rule is {self.rule})")
        if self.rule == "hyperband":
            if self.max_resource is None:
                raise ValueError("max_resource: the hyperband rule needs it (it sets the brackets)")
            if self.min_early_stopping_rate:
                raise ValueError("min_early_stopping_rate: the hyperband rule sets it per bracket")
        if self.rule in ("asha", "hyperband") and self.max_resource is not None and self.max_resource < self.first_rung:
            raise ValueError(f"max_resource: {self.max_resource} is below the first rung ({self.first_rung})")
        return self

    @property
    def first_rung(self) -> int:
        return (self.min_resource or self.min_steps) * self.reduction_factor ** self.min_early_stopping_rate


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_' or '-'; at most 100")
    trainer: str = Field(min_length=1, max_length=100)
    config: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    zip: list[dict[str, list[Any]]] = Field(default_factory=list)
    sample: SampleSpec | None = None
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    max_attempts: int = Field(default=3, ge=1, le=100)
    resources: Resources = Field(default_factory=Resources)
    code_rev: str | None = Field(default=None, min_length=4, max_length=100, pattern=r"^[A-Za-z0-9._/-]+$")
    objective: str | None = Field(default=None, pattern=r"^(min|max):[A-Za-z0-9_./-]+$")
    # Where checkpoints and results go: "local" or "hf://owner/repo[@branch]"; unset: each worker's setting.
    store: str | None = Field(default=None, max_length=300)
    # The grid this one refines (`gridfleet refine`): a grid name; stored as grids.parent_id when created.
    parent: str | None = Field(default=None, pattern=NAME_PATTERN)
    # Early stopping of hopeless configs (docs/early_stopping.md).
    prune: PruneSpec | None = None
    # A sampler's search instead of (or beside: one search per axis point) the cartesian product.
    search: SearchSpec | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _exact_json(cls, value, info: ValidationInfo):
        # Before anything else: expansion deep-copies configs (RecursionError when nested ~300 deep), and
        # configs are exact user input, so NUL or a lone surrogate anywhere is an error naming the field.
        try:
            return check(value, info.field_name)
        except BadValue as exc:
            raise ValueError(exc.under(info.field_name)) from None

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

    @field_validator("sample")
    @classmethod
    def _sample_keys_not_swept(cls, sample, info: ValidationInfo):
        if sample is None:
            return sample
        swept = _swept_keys(info)
        for key in sample.params:
            if key in swept:
                raise ValueError(f"key '{key}' is both sampled and swept (in axes or zip)")
        return sample

    @field_validator("prune")
    @classmethod
    def _prune_has_metric(cls, prune, info: ValidationInfo):
        # `objective` is declared before `prune`: the rule's metric and mode may come from it.
        if prune is None:
            return prune
        parts = _objective_parts(info.data.get("objective"))
        if prune.metric is None:
            if parts is None:
                raise ValueError("metric: name the metric to prune on (or give the grid an objective)")
            prune.metric = parts[1]
        if prune.mode is None:
            prune.mode = parts[0] if parts and parts[1] == prune.metric else "min"
        return prune

    @field_validator("search")
    @classmethod
    def _search_fits_grid(cls, search, info: ValidationInfo):
        if search is None:
            return search
        sample = info.data.get("sample")
        swept = _swept_keys(info) | set(sample.params if sample is not None else ())
        for key in search.space:
            if key in swept:
                raise ValueError(f"space.{key}: the key is both searched and swept (in axes, zip or sample)")
        # The search's metric and direction and the grid's objective are one thing: either gives the other.
        objective = info.data.get("objective")
        parts = _objective_parts(objective)
        if search.metric is None:
            if parts is None:
                raise ValueError("metric: name the result key to optimise (or give the grid an objective such "
                                 "as 'min:loss')")
            search.metric = parts[1]
        if search.direction is None:
            search.direction = "maximize" if parts is not None and parts[0] == "max" else "minimize"
        if parts is not None and parts != (search.direction[:3], search.metric):
            raise ValueError(f"metric: the search optimises {search.direction} {search.metric} but the grid's "
                             f"objective is '{objective}'; make them agree")
        return search

    @model_validator(mode="after")
    def _objective_from_search(self):
        if self.search is not None and self.objective is None:  # results then rank the way the search does
            self.objective = f"{self.search.direction[:3]}:{self.search.metric}"
        return self

    @property
    def objective_parts(self) -> tuple[str, str] | None:
        return _objective_parts(self.objective)

    def job_count_upper_bound(self) -> int:
        count = len(self.seeds)
        for values in self.axes.values():
            count *= len(values)
        for group in self.zip:
            count *= len(next(iter(group.values())))
        if self.sample is not None:
            count *= self.sample.n
        if self.search is not None:
            count *= self.search.n_trials
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


def _list_index(node: Any, part: str) -> int | None:
    """`part` as an index into `node` when node is a list and part a valid index, else None."""
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return int(part)
    return None


def _set_path(config: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node: Any = config
    for part in parts[:-1]:
        index = _list_index(node, part)
        if index is not None:
            child = node[index]
        elif isinstance(node, dict):
            child = node.setdefault(part, {})
        else:
            raise GridError(f"axes.{path}", f"'{part}' is not a key or an index of the base config there")
        if not isinstance(child, (dict, list)):
            raise GridError(f"axes.{path}", f"'{part}' is not a mapping in the base config")
        node = child
    index = _list_index(node, parts[-1])
    if index is not None:
        node[index] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise GridError(f"axes.{path}", f"'{parts[-1]}' is not an index of the list in the base config")


set_path = _set_path  # for scheduler/refine.py: the same dotted keys as axes


def _get_path(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        index = _list_index(node, part)
        if index is not None:
            node = node[index]
            continue
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _excluded(config: dict[str, Any], patterns: list[dict[str, Any]]) -> bool:
    return any(all(_get_path(config, k) == v for k, v in pattern.items()) for pattern in patterns)


def expand(spec: GridSpec) -> list[JobSpec]:
    """All jobs of a grid, in a deterministic order (axes in spec order, then zip groups, sample draws, seeds)."""
    bound = spec.job_count_upper_bound()
    if bound > MAX_JOBS_PER_GRID:
        raise GridError("axes", f"the grid expands to {bound:,} jobs; the limit is {MAX_JOBS_PER_GRID:,}")
    axis_items = [[(key, value) for value in values] for key, values in spec.axes.items()]
    zip_items = [
        [list(zip(group.keys(), row)) for row in zip(*group.values())] for group in spec.zip
    ]
    if spec.sample is not None:  # the draws advance together, like one more zip group
        zip_items.append(spec.sample.rows())
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


def with_params(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with each searched key (a dotted path, as axes) set to its value."""
    out = copy.deepcopy(config)
    for key, value in params.items():
        _set_path(out, key, copy.deepcopy(value))
    return out


def search_probes(spec: GridSpec, points: list[JobSpec]) -> list[JobSpec]:
    """Configs to validate a search grid with at POST: each point with one searched key at a time at each
    of its ends (or choices), the others at their low end. A trial's config lies between them."""
    assert spec.search is not None
    space = spec.search.space
    lows = {key: param.probes()[0] for key, param in space.items()}
    probes = []
    for point in points:
        for key, param in space.items():
            for value in param.probes():
                try:
                    config = with_params(point.config, {**lows, key: value})
                except GridError as exc:
                    raise GridError(f"search.space.{key}", exc.message) from None
                probes.append(JobSpec(key=point.key, config=config, seed=point.seed))
    return probes


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


def _swept_keys(info: ValidationInfo) -> set[str]:
    """The config keys the grid's axes and zip groups sweep (validated before `sample` and `search`)."""
    swept = set(info.data.get("axes") or {})
    for group in info.data.get("zip") or []:
        swept.update(group)
    return swept


def _objective_parts(objective: str | None) -> tuple[str, str] | None:
    """"min:loss" -> ("min", "loss"); None when the grid names no objective."""
    if not objective:
        return None
    direction, metric = objective.split(":", 1)
    return direction, metric
