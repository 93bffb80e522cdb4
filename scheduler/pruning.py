"""Early stopping of hopeless configs: the scheduler decides from the metrics workers already send
(docs/early_stopping.md).

Read `Pruner.check` first: Queue.heartbeat and gang.heartbeat_gang call it after their fenced write has
stored the beat's metrics, and a reason it returns goes back in the heartbeat reply as `prune: true`. The
worker then stops the job as for a cancel and finishes it with outcome `pruned`.

The rules are Optuna's own pruners, asked through its ask-and-tell interface on an in-memory study rebuilt
for each decision from our tables (no Optuna storage: the search helper's RDBStorage stays its own):
- asha: optuna.pruners.SuccessiveHalvingPruner (asynchronous successive halving, Li et al. 2020). A job's
  value at a rung is the first value it reports at or after the rung's step; the values every job had at
  each rung are kept in `prune_rungs`, and the decisions of one grid are serialized (a Postgres advisory
  lock per grid; SQLite has one writer), so two heartbeats at the same rung never both read the rung
  without the other's value. The best value at a rung is always promoted.
- hyperband: optuna.pruners.HyperbandPruner (Li et al. 2018) through the same rung study: several ASHA
  brackets, each job in one of them, chosen from its job id (`JobBrackets`), each bracket deciding among its
  own jobs only; bracket b's rung k is at min_resource * eta^(b + k).
- median: optuna.pruners.MedianPruner against the succeeded jobs' values at the same step (our metrics).
- threshold: optuna.pruners.ThresholdPruner on the job's own values.
A decision is written on the job (pruned_step, pruned_by) in the same transaction; a later beat of the same
job is told again without deciding anew. A job resumed by hand (prune_exempt) is never pruned again.

Exact rung stops: a claimed job carries `prune_steps` (`Pruner.judge_steps`: its rungs below max_resource,
ASHA's or its Hyperband bracket's). At the first report at or past one, the worker's child waits (bounded) for the verdict of a
heartbeat the agent sends at once, so a pruned job stops at its rung instead of at the next regular beat.
The median and threshold rules judge at every report past their warm-up: their jobs never wait.
"""
from __future__ import annotations

import binascii
import functools
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import Connection, Engine, Select, insert, select, text, update

from common import schema as t
from common.db import is_sqlite, read_tx, write_tx
from scheduler.spec import PruneSpec

RULE_CACHE_SECONDS = 5.0  # a re-posted grid's new rule applies within this long
MAX_CACHED_JOBS = 100_000
_LOCK_CLASS = 0x6766  # pg_advisory_xact_lock(class, grid_id): "gf", apart from anyone else's locks
RUNG_RULES = ("asha", "hyperband")  # rules that decide at rungs, in the rung study


@dataclass(frozen=True)
class Point:
    step: int
    value: float


def rule_of(prune: dict[str, Any] | None) -> PruneSpec | None:
    """The grid's prune rule from its stored spec's `prune` member (prune_member; validated when posted)."""
    return PruneSpec.model_validate(prune) if prune else None


def prune_member(grid_id: int) -> Select:
    """The `prune` member of the grid's stored spec (NULL without one), read in the database: the whole spec of
    a 100,000-job grid is about 900 KB of JSON, and fetching and decoding it cost a Queue 7-9 ms of CPU on every
    refresh of its cached rule (0.6-1.7 ms this way)."""
    return select(t.grids.c.spec["prune"]).where(t.grids.c.id == grid_id)


def points(metrics: Iterable[Any], metric: str) -> list[Point]:
    """The beat's values of `metric` (Metric objects), by step; values that are not finite numbers are
    skipped (a NaN reaches us as null: the context sends non-finite values so)."""
    out: dict[int, float] = {}
    for m in metrics:
        value = m.values.get(metric) if isinstance(m.values, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[int(m.step)] = float(value)
    return [Point(step, out[step]) for step in sorted(out)]


class Pruner:
    """One per Queue. Holds only caches (job -> grid, grid -> rule); every decision is made in the database."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sqlite = is_sqlite(engine)
        self._grid_of: dict[int, int] = {}
        self._rules: dict[int, tuple[float, PruneSpec | None]] = {}
        self._next_rung: dict[int, int] = {}  # asha: the step of a job's next undecided rung
        self._studies: dict[int, RungStudy] = {}  # asha: each grid's rungs, kept up to date in each decision

    def check(self, job_id: int, metrics: list[Any] | None, now: float | None = None) -> str | None:
        """Why the job must stop now, or None. Cheap for grids without a rule (cached lookups only), and for
        ASHA beats below the job's next rung."""
        if not metrics:
            return None
        grid_id = self._grid(job_id)
        rule = self._rule(grid_id) if grid_id is not None else None
        if rule is None:
            return None
        beat = points(metrics, rule.metric)
        if not beat or beat[-1].step < max(_earliest_step(rule), self._next_rung.get(job_id, 0)):
            return None
        now = time.time() if now is None else now
        if rule.rule not in RUNG_RULES:  # pure functions of what is recorded: decide on a read, write only a prune
            with read_tx(self.engine) as conn:
                found = _unless_decided(conn, job_id)
                if found is None:
                    found = (_median if rule.rule == "median" else _threshold)(conn, rule, grid_id, job_id, beat)
            if isinstance(found, str) or found is None:
                return found
            with write_tx(self.engine) as conn:
                return _record(conn, job_id, *found, now)
        direction = "minimize" if rule.mode == "min" else "maximize"
        rungs = self._studies.get(grid_id)
        if rungs is None or rungs.direction != direction:
            rungs = self._studies[grid_id] = RungStudy(direction)
        try:
            with write_tx(self.engine) as conn:
                if not self._sqlite:  # one decision of this grid at a time (SQLite: one writer anyway)
                    conn.execute(text("SELECT pg_advisory_xact_lock(:c, :g)"), {"c": _LOCK_CLASS, "g": grid_id})
                found = _unless_decided(conn, job_id)
                if found is None:
                    found, recorded = _asha(conn, rule, grid_id, job_id, beat, now, rungs)
                    # Until the job reaches its next rung, its beats need no statement (a prune is told anew).
                    self._next_rung[job_id] = 0 if found else rung_step(rule, recorded, rate_of(rule, job_id))
                    if len(self._next_rung) >= MAX_CACHED_JOBS:
                        self._next_rung.clear()
                if isinstance(found, str) or found is None:
                    return found
                return _record(conn, job_id, *found, now)
        except BaseException:
            self._studies.pop(grid_id, None)  # it may hold what was rolled back: rebuild it next time
            self._next_rung.pop(job_id, None)
            raise

    def judge_steps(self, grid_id: int, job_id: int) -> list[int]:
        """The steps at which the grid's rule decides about the job, for its worker to wait for the verdict
        there; [] for grids without a rule and for rules that judge every report (median, threshold)."""
        rule = self._rule(grid_id)
        return rungs_below_max(rule, rate_of(rule, job_id)) if rule is not None and rule.rule in RUNG_RULES else []

    def _grid(self, job_id: int) -> int | None:
        grid_id = self._grid_of.get(job_id)
        if grid_id is None:
            with self.engine.connect() as conn:
                grid_id = conn.execute(select(t.jobs.c.grid_id).where(t.jobs.c.id == job_id)).scalar()
            if grid_id is not None:
                if len(self._grid_of) >= MAX_CACHED_JOBS:
                    self._grid_of.clear()
                self._grid_of[job_id] = grid_id  # a job never changes grid
        return grid_id

    def _rule(self, grid_id: int) -> PruneSpec | None:
        cached = self._rules.get(grid_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        with self.engine.connect() as conn:
            prune = conn.execute(prune_member(grid_id)).scalar()
        rule = rule_of(_loads(prune))
        self._rules[grid_id] = (time.monotonic() + RULE_CACHE_SECONDS, rule)
        return rule


def _unless_decided(conn: Connection, job_id: int) -> str | bool | None:
    """The reason a job was already pruned for; False when no rule may prune it (resumed by hand, or not
    running); None when there is a decision to make."""
    job = conn.execute(select(t.jobs.c.prune_exempt, t.jobs.c.pruned_by, t.jobs.c.state)
                       .where(t.jobs.c.id == job_id)).first()
    if job is None or job.prune_exempt or job.state != "running":
        return False
    return job.pruned_by or None


def _record(conn: Connection, job_id: int, step: int, reason: str, now: float) -> str:
    """Write the decision on the job, once: a concurrent decision that came first wins, and is told."""
    written = conn.execute(update(t.jobs).where(t.jobs.c.id == job_id, t.jobs.c.pruned_by.is_(None))
                           .values(pruned_step=step, pruned_by=reason)).rowcount
    if not written:
        return conn.execute(select(t.jobs.c.pruned_by).where(t.jobs.c.id == job_id)).scalar() or reason
    conn.execute(insert(t.events).values(job_id=job_id, time=now, kind="prune",
                                         message=f"pruned at step {step}: {reason}"))
    return reason


def _earliest_step(rule: PruneSpec) -> int:
    if rule.rule in RUNG_RULES:  # hyperband: bracket 0's first rung
        return rule.first_rung
    return rule.min_steps if rule.n_warmup_steps is None else max(rule.n_warmup_steps, 1)


def _study(rule: PruneSpec, pruner):
    import optuna  # here, not at import: the queue module stays light for grids without rules

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="minimize" if rule.mode == "min" else "maximize", pruner=pruner)


# ---- asha and hyperband ------------------------------------------------------------------------------
def rung_step(rule: PruneSpec, rung: int, rate: int) -> int:
    """Rung `rung`'s step for a job whose early-stopping rate is `rate` (`rate_of`)."""
    return (rule.min_resource or rule.min_steps) * rule.reduction_factor ** (rate + rung)


MAX_RUNG_STEP = 1_000_000_000  # without max_resource: the rungs up to the largest step a spec may name


def rungs_below_max(rule: PruneSpec, rate: int) -> list[int]:
    """The steps of the rungs that decide: every rung below max_resource."""
    cap = rule.max_resource if rule.max_resource is not None else MAX_RUNG_STEP + 1
    steps, rung = [], 0
    while rung_step(rule, rung, rate) < cap:
        steps.append(rung_step(rule, rung, rate))
        rung += 1
    return steps


def _last_rung_step(rule: PruneSpec, rate: int) -> int:
    """The step of the last rung below max_resource (the caller checked that the first is below it)."""
    rung = 0
    while rung_step(rule, rung + 1, rate) < rule.max_resource:
        rung += 1
    return rung_step(rule, rung, rate)


def rate_of(rule: PruneSpec, job_id: int) -> int:
    """The job's early-stopping rate: the spec's for asha; its bracket's for hyperband (bracket b is
    Optuna's SuccessiveHalvingPruner with min_early_stopping_rate b)."""
    if rule.rule != "hyperband":
        return rule.min_early_stopping_rate
    return _rung_pruner(rule).bracket(job_id)


def _rung_pruner(rule: PruneSpec):
    import optuna

    if rule.rule == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=rule.min_resource or rule.min_steps, reduction_factor=rule.reduction_factor,
            min_early_stopping_rate=rule.min_early_stopping_rate, bootstrap_count=rule.bootstrap_count)
    return _hyperband(rule.min_resource or rule.min_steps, rule.max_resource, rule.reduction_factor,
                      rule.bootstrap_count)


@functools.lru_cache(maxsize=64)
def _hyperband(min_resource: int, max_resource: int, reduction_factor: int, bootstrap_count: int):
    """One JobBrackets per setting, set up here (its brackets are asked for outside any study: judge_steps)."""
    pruner = _job_brackets()(min_resource=min_resource, max_resource=max_resource,
                             reduction_factor=reduction_factor, bootstrap_count=bootstrap_count)
    pruner._try_initialization(None)  # an int max_resource reads nothing of the study
    return pruner


_JOB_BRACKETS = None


def _job_brackets():
    """Optuna's HyperbandPruner, a trial's bracket chosen from its job id (the trial's `job_id` system
    attribute) instead of its trial number: a rung study's trial numbers follow the order in which one API
    process met the jobs, which another process (or a rebuilt study) need not share. The brackets' sizes
    and everything else are Optuna's (its allocation budgets; the hash is crc32, as its own)."""
    global _JOB_BRACKETS
    if _JOB_BRACKETS is None:
        import optuna

        class JobBrackets(optuna.pruners.HyperbandPruner):
            def bracket(self, job_id: int) -> int:
                n = binascii.crc32(f"job_{job_id}".encode()) % self._total_trial_allocation_budget
                for bracket_id, budget in enumerate(self._trial_allocation_budgets):
                    n -= budget
                    if n < 0:
                        return bracket_id
                raise AssertionError("the budgets add up to their total")

            def _get_bracket_id(self, study, trial) -> int:
                return self.bracket(trial.system_attrs["job_id"])

        _JOB_BRACKETS = JobBrackets
    return _JOB_BRACKETS


class RungStudy:
    """One grid's rungs as an in-memory Optuna study: a RUNNING trial per job, whose system attributes
    `completed_rung_K` are the job's values at the rungs (what SuccessiveHalvingPruner reads and writes).

    Kept between decisions and brought up to date from `prune_rungs` (rows after the last one it has seen)
    inside each decision's transaction, under the grid's lock: rebuilding the study each time costs about
    65 us a job (110 ms at 432 jobs), held under that lock."""

    def __init__(self, direction: str):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction=direction)
        self.direction = direction
        self.seen = 0  # the last prune_rungs id applied
        self.trial_of: dict[int, int] = {}  # job id -> trial id

    def trial(self, job_id: int) -> int:
        trial_id = self.trial_of.get(job_id)
        if trial_id is None:
            trial_id = self.trial_of[job_id] = self.study.ask()._trial_id
            self.study._storage.set_trial_system_attr(trial_id, "job_id", job_id)  # hyperband's bracket
        return trial_id

    def catch_up(self, conn: Connection, grid_id: int) -> None:
        rows = conn.execute(select(t.prune_rungs.c.id, t.prune_rungs.c.job_id, t.prune_rungs.c.rung,
                                   t.prune_rungs.c.value)
                            .where(t.prune_rungs.c.grid_id == grid_id, t.prune_rungs.c.id > self.seen)
                            .order_by(t.prune_rungs.c.id)).all()
        for row in rows:
            self.study._storage.set_trial_system_attr(self.trial(row.job_id), f"completed_rung_{row.rung}", row.value)
            self.seen = row.id

    def rungs_of(self, job_id: int) -> dict[int, float]:
        attrs = self.study._storage.get_trial(self.trial(job_id)).system_attrs
        return {int(k.rsplit("_", 1)[1]): v for k, v in attrs.items() if k.startswith("completed_rung_")}

    def competing(self, rung: int, rule: PruneSpec, rate: int) -> int:
        """How many jobs of the rate's bracket (all, for asha) have a value at the rung."""
        key = f"completed_rung_{rung}"
        return sum(1 for trial in self.study.get_trials(deepcopy=False) if key in trial.system_attrs
                   and (rule.rule != "hyperband" or rate_of(rule, trial.system_attrs["job_id"]) == rate))


def _asha(conn: Connection, rule: PruneSpec, grid_id: int, job_id: int, beat: list[Point], now: float,
          rungs: RungStudy) -> tuple[tuple[int, str] | None, int]:
    """(step, reason) when the job is pruned, else None; and how many rungs the job has recorded now."""
    rungs.catch_up(conn, grid_id)
    own = rungs.rungs_of(job_id)
    next_rung = len(own)  # rungs are recorded in order, from 0
    rate = rate_of(rule, job_id)
    if any(r not in own for r in range(next_rung)):
        return None, next_rung  # cannot happen (recorded in order); be safe rather than decide on a gap
    if rule.max_resource is not None and rung_step(rule, next_rung, rate) >= rule.max_resource:
        return None, next_rung  # rungs at or past the last step decide nothing (Optuna has no cap)
    pending = [p for p in beat if p.step >= rung_step(rule, next_rung, rate)]
    if not pending:
        return None, next_rung
    pruner = _rung_pruner(rule)
    point = pending[0]  # the first value at or after the rung's step is the job's value there
    # Optuna goes on up the rungs a step passes; it has no cap: a step past the last rung before max_resource
    # is given to it as that rung's step, so it never decides at or past max_resource.
    step = point.step if rule.max_resource is None else min(point.step, _last_rung_step(rule, rate))
    trial_id = rungs.trial(job_id)
    storage = rungs.study._storage
    storage.set_trial_intermediate_value(trial_id, step, point.value)
    pruned = pruner.prune(rungs.study, storage.get_trial(trial_id))  # what trial.should_prune() asks
    new = sorted(r for r in rungs.rungs_of(job_id) if r not in own)
    for rung in new:
        rungs.seen = max(rungs.seen, conn.execute(insert(t.prune_rungs).values(
            grid_id=grid_id, job_id=job_id, rung=rung, step=point.step, value=point.value,
            promoted=not (pruned and rung == new[-1]), time=now)).inserted_primary_key[0])
    if not pruned:
        return None, next_rung + len(new)
    rung = new[-1] if new else next_rung
    where = f" of bracket {rate}" if rule.rule == "hyperband" else ""
    return (point.step, f"{rule.rule}: {rule.metric} {point.value:.6g} at step {point.step} is not in the best "
                        f"1/{rule.reduction_factor} of the {rungs.competing(rung, rule, rate)} values recorded at "
                        f"rung {rung}{where} (step {rung_step(rule, rung, rate)})"), next_rung + len(new)


# ---- median and threshold: pure functions of what is recorded ------------------------------------------
def _history(conn: Connection, job_id: int, metric: str, before_step: int | None = None) -> list[Point]:
    query = select(t.metrics.c.step, t.metrics.c["values"]).where(t.metrics.c.job_id == job_id)
    if before_step is not None:
        query = query.where(t.metrics.c.step < before_step)
    rows = conn.execute(query.order_by(t.metrics.c.step, t.metrics.c.id)).all()
    return points([_Row(step, _loads(values)) for step, values in rows], metric)


@dataclass
class _Row:
    step: int
    values: Any


def _ask_with_history(study, conn: Connection, rule: PruneSpec, job_id: int, beat: list[Point]):
    trial = study.ask()
    for p in _history(conn, job_id, rule.metric, before_step=beat[0].step):
        trial.report(p.value, p.step)
    return trial


def _first_pruned(trial, rule: PruneSpec, beat: list[Point]) -> Point | None:
    """Report the beat's values in order, asking after each, as a trainer calling Optuna would."""
    for p in beat:
        trial.report(p.value, p.step)
        if p.step >= _earliest_step(rule) and trial.should_prune():
            return p
    return None


def _median(conn: Connection, rule: PruneSpec, grid_id: int, job_id: int,
            beat: list[Point]) -> tuple[int, str] | None:
    import optuna
    from optuna.trial import TrialState, create_trial

    done = conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid_id, t.jobs.c.state == "succeeded")
                        ).scalars().all()
    if len(done) < max(rule.n_startup_trials, 1):
        return None
    warmup = rule.min_steps if rule.n_warmup_steps is None else rule.n_warmup_steps
    study = _study(rule, optuna.pruners.MedianPruner(
        n_startup_trials=rule.n_startup_trials, n_warmup_steps=warmup, interval_steps=rule.interval_steps,
        n_min_trials=rule.n_min_trials))
    # Optuna's percentile reads the completed trials' values at the step being judged only: read those steps.
    steps = sorted({p.step for p in beat})
    curves: dict[int, dict[int, float]] = {}
    for start in range(0, len(done), 500):  # bounded IN lists (SQLite caps bound parameters)
        rows = conn.execute(select(t.metrics.c.job_id, t.metrics.c.step, t.metrics.c["values"])
                            .where(t.metrics.c.job_id.in_(done[start:start + 500]), t.metrics.c.step.in_(steps))
                            .order_by(t.metrics.c.id)).all()
        for other, step, values in rows:
            for p in points([_Row(step, _loads(values))], rule.metric):
                curves.setdefault(other, {})[p.step] = p.value
    for other in done:  # every succeeded job counts for n_startup_trials, with a value there or not
        curve = curves.get(other, {})
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=curve[max(curve)] if curve else 0.0,
                                     intermediate_values=curve))
    trial = _ask_with_history(study, conn, rule, job_id, beat)
    point = _first_pruned(trial, rule, beat)
    if point is None:
        return None
    best = (min if rule.mode == "min" else max)(_trial_values(study, trial))
    return point.step, (f"median: best {rule.metric} so far {best:.6g} at step {point.step} is worse than the "
                        f"median of the {len(done)} succeeded jobs at that step")


def _trial_values(study, trial) -> list[float]:
    return list(study._storage.get_trial(trial._trial_id).intermediate_values.values())


def _threshold(conn: Connection, rule: PruneSpec, grid_id: int, job_id: int,
               beat: list[Point]) -> tuple[int, str] | None:
    import optuna

    warmup = rule.min_steps if rule.n_warmup_steps is None else rule.n_warmup_steps
    study = _study(rule, optuna.pruners.ThresholdPruner(
        lower=rule.lower, upper=rule.upper, n_warmup_steps=warmup, interval_steps=rule.interval_steps))
    trial = _ask_with_history(study, conn, rule, job_id, beat)
    point = _first_pruned(trial, rule, beat)
    if point is None:
        return None
    side = f"below lower {rule.lower:g}" if rule.lower is not None and point.value < rule.lower \
        else f"above upper {rule.upper:g}"
    return point.step, f"threshold: {rule.metric} {point.value:.6g} at step {point.step} is {side}"


def _loads(value):
    return json.loads(value) if isinstance(value, str) else value
