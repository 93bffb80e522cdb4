"""Searches (a grid's `search:`; docs/searches.md): an Optuna sampler picks each next config from the results
so far, and every trial's config becomes an ordinary job of the grid (same identity, dedup and fences).

How to read it: `Searches.advance(grid_id)` is the whole loop for one grid, top to bottom. It takes the grid's
asking lease (searches.lock_owner/lock_until; on Postgres under a session advisory lock, so a holder that
died gives way at once), then for each point (an axis point and seed; a grid without
axes has one) runs `_tell` (finished jobs -> the sampler), `_adopt` (trials asked but never stored: a crash
between the two) and `_ask` (new trials, up to `parallel` in flight and `n_trials` in all), and hands the
lease back. All state is in the database (Optuna's study tables + searches/search_trials + jobs), so any
process may call it at any time, as often as it likes: the API after each finish and on a timer
(`SearchLoop`), `gridfleet run` while it watches. A second caller finds the lease taken, bumps `wake` and
returns; the holder sees the bump and looks once more before it lets go.

Never more than n_trials jobs: a trial's job and its search_trials row are written in one transaction that
also checks this caller still holds the lease and counts the point's jobs. A config suggested twice runs
once: the second trial is stored as a duplicate of the first one's job and told the same result.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from sqlalchemy import Engine, and_, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from common import schema as t
from common.db import is_sqlite, is_unavailable, read_tx, write_tx
from scheduler.grids import job_row
from scheduler.spec import GridError, GridSpec, JobSpec, SearchSpec, canonical_json, expand, job_key, with_params

log = logging.getLogger("gridfleet.search")

# The asking lease. Every write of a holder renews it, so it only has to outlast one Optuna ask or tell; a
# holder that died (an API killed mid-advance) holds up the search's asking for at most this long.
LEASE_SECONDS = 10.0
ADVISORY_SPACE = 0x67726964  # "grid": the first key of the Postgres advisory locks taken here
MAX_ROUNDS = 3  # an advance woken while busy looks again at most this often (the timer covers the rest)
MAX_DUPLICATE_ASKS = 32  # per point and advance: asks answered by an existing job before it waits for results
LIVE_WORKER_SECONDS = 60.0  # parallel=None: workers seen this recently count
RUNNING_CACHE_SECONDS = 1.0  # the finish hook reads which searches run at most this often (none: no query)
ENDED = ("succeeded", "failed", "cancelled", "pruned")  # job states whose result the sampler is told
Hook = Callable[[str, dict[str, Any]], "str | None"]  # (trainer, config) -> external id / fuse key


class LostLease(RuntimeError):
    """Another caller took the grid's asking lease (this one was slower than LEASE_SECONDS)."""


@dataclass
class Point:
    """One search: a base config and seed (one axis point) with its own Optuna study."""
    job: JobSpec
    study_name: str


def study_name(grid_id: int, created_at: float, point_key: str) -> str:
    # The grid's creation time too: a grid id can come back after a grid is deleted, its study must not.
    return f"gridfleet:{grid_id}:{int(created_at * 1e6)}:{point_key[:16]}"


def trial_state(job_state: str | None, result: dict[str, Any] | None, metric: str) -> tuple[str, float | None]:
    """What to tell the sampler about a trial whose job ended (None: it has no job, it was never run)."""
    if job_state == "succeeded":
        value = (result or {}).get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return "COMPLETE", float(value)
        return "FAIL", None  # the result lacks the metric: nothing to learn from
    if job_state == "pruned":
        return "PRUNED", None
    return "FAIL", None


class Searches:
    """Advances the searches of one database. Thread-safe: each advance holds the lease under its own id."""

    def __init__(self, engine: Engine, external_id: Hook | None = None, fuse_key: Hook | None = None):
        self.engine = engine
        self.external_id = external_id
        self.fuse_key = fuse_key
        self._storage = None
        self._storage_lock = threading.Lock()
        self._running: tuple[float, frozenset[int]] = (0.0, frozenset())  # (read at, grid ids)

    # ---- entry points ----------------------------------------------------------------------------
    def advance_all(self) -> int:
        """Advance every search that is not done; returns how many were advanced by this call."""
        with read_tx(self.engine) as conn:
            grid_ids = conn.execute(select(t.searches.c.grid_id).where(t.searches.c.state == "running")
                                    .order_by(t.searches.c.grid_id)).scalars().all()
        return sum(self.advance(grid_id) for grid_id in grid_ids)

    def after_finish(self, job_ids: list[int]) -> None:
        """The finish hook: advance the searches these jobs belong to. Never raises: a finish must not fail
        because of the search (the API's timer and the next finish try again). While no search runs, it costs
        one small query a second, not one per finish (a search started meanwhile elsewhere waits for the
        timer at most that long)."""
        try:
            if not job_ids or not self._running_searches():
                return
            st = t.search_trials
            with read_tx(self.engine) as conn:
                rows = conn.execute(
                    select(st.c.grid_id, st.c.point).distinct()
                    .join(t.searches, t.searches.c.grid_id == st.c.grid_id)
                    .where(st.c.job_id.in_(job_ids), t.searches.c.state == "running")).all()
            points: dict[int, set[str]] = {}
            for row in rows:
                points.setdefault(row.grid_id, set()).add(row.point)
            for grid_id in sorted(points):  # only the finished jobs' points: the timer looks at all of them
                self.advance(grid_id, points[grid_id])
        except Exception as exc:  # noqa: BLE001 - logged; the search goes on at the next advance
            _log_failure(exc, f"advancing the search after finishing job(s) {job_ids} failed; it is retried later")

    def _running_searches(self) -> frozenset[int]:
        read_at, grid_ids = self._running
        if time.monotonic() - read_at >= RUNNING_CACHE_SECONDS:
            with read_tx(self.engine) as conn:
                grid_ids = frozenset(conn.execute(select(t.searches.c.grid_id)
                                                  .where(t.searches.c.state == "running")).scalars())
            self._running = (time.monotonic(), grid_ids)
        return grid_ids

    def forget_running(self) -> None:
        """A search was just submitted here: the next finish hook reads the running searches again."""
        self._running = (0.0, frozenset())

    def advance(self, grid_id: int, points: set[str] | None = None) -> bool:
        """Tell, adopt and ask for one grid (`points`: only those points' searches, by point key; None: all).
        False when another caller holds the lease (it will look again)."""
        with self._session_lock(grid_id) as locked:
            if locked is False:  # a live holder (Postgres knows): make it look again before it lets go
                self._wake(grid_id)
                return False
            return self._advance_leased(grid_id, points, take_over=locked is True)

    def _advance_leased(self, grid_id: int, points: set[str] | None, take_over: bool) -> bool:
        owner = uuid.uuid4().hex
        seen = self._acquire(grid_id, owner, take_over)
        if seen is None:
            return False
        try:
            for round_ in range(1, MAX_ROUNDS + 1):
                done = self._advance_held(grid_id, owner, points if round_ == 1 else None)  # woken: look at all
                if self._release(grid_id, owner, None if round_ == MAX_ROUNDS else seen, done):
                    return True
                seen = self._wake_seen(grid_id, owner)  # woken while busy: look once more
                if seen is None:
                    return False
            return True
        except LostLease:
            log.warning("search of grid %s: the asking lease passed to another caller; it goes on there", grid_id)
            return False
        except BaseException:
            self._release(grid_id, owner, None, False)
            raise

    # ---- the lease -------------------------------------------------------------------------------
    @contextmanager
    def _session_lock(self, grid_id: int) -> Iterator[bool | None]:
        """Postgres: a session advisory lock on the grid for the whole advance. The server drops it the moment
        its holder's connection dies, so an API killed mid-advance does not hold up asking until its lease
        runs out: whoever gets the lock may take the lease over. True: got it; False: a live holder has it.
        SQLite: None, the lease alone decides (`gridfleet run` clears its grid's lease when it starts)."""
        if is_sqlite(self.engine):
            yield None
            return
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            key = {"space": ADVISORY_SPACE, "grid": grid_id}
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:space, :grid)"), key).scalar())
            try:
                yield got
            finally:
                if got:
                    try:
                        conn.execute(text("SELECT pg_advisory_unlock(:space, :grid)"), key)
                    except SQLAlchemyError:
                        conn.invalidate()  # closing the connection releases the lock server-side

    def clear_lease(self, grid_id: int) -> None:
        """Drop a grid's asking lease: only for a caller that knows no other process can hold it (`gridfleet
        run`, under its single-run lock, after an earlier run was killed)."""
        with write_tx(self.engine) as conn:
            conn.execute(update(t.searches).where(t.searches.c.grid_id == grid_id)
                         .values(lock_owner=None, lock_until=0.0))

    def _acquire(self, grid_id: int, owner: str, take_over: bool) -> int | None:
        now = time.time()
        s = t.searches
        free = (s.c.lock_owner.is_(None)) | (s.c.lock_until < now)
        with write_tx(self.engine) as conn:
            row = conn.execute(
                update(s).where(s.c.grid_id == grid_id, s.c.state == "running", *([] if take_over else [free]))
                .values(lock_owner=owner, lock_until=now + LEASE_SECONDS).returning(s.c.wake)
            ).first()
        if row is None:  # busy (or done): make the holder look again before it lets go
            self._wake(grid_id)
            return None
        return row.wake

    def _wake(self, grid_id: int) -> None:
        s = t.searches
        with write_tx(self.engine) as conn:
            conn.execute(update(s).where(s.c.grid_id == grid_id, s.c.state == "running").values(wake=s.c.wake + 1))

    def _release(self, grid_id: int, owner: str, seen: int | None, done: bool) -> bool:
        s = t.searches
        where = [s.c.grid_id == grid_id, s.c.lock_owner == owner]
        if seen is not None:
            where.append(s.c.wake == seen)
        values: dict[str, Any] = {"lock_owner": None, "lock_until": 0.0, "updated_at": time.time()}
        if done:
            values["state"] = "done"
        with write_tx(self.engine) as conn:
            return conn.execute(update(s).where(*where).values(**values)).rowcount == 1

    def _wake_seen(self, grid_id: int, owner: str) -> int | None:
        s = t.searches
        with write_tx(self.engine) as conn:
            row = conn.execute(update(s).where(s.c.grid_id == grid_id, s.c.lock_owner == owner)
                               .values(lock_until=time.time() + LEASE_SECONDS).returning(s.c.wake)).first()
        return None if row is None else row.wake

    @staticmethod
    def _fence(conn, grid_id: int, owner: str) -> None:
        """Inside a write transaction: this caller still holds the lease (and keeps it a while longer)."""
        s = t.searches
        held = conn.execute(update(s).where(s.c.grid_id == grid_id, s.c.lock_owner == owner)
                            .values(lock_until=time.time() + LEASE_SECONDS)).rowcount
        if held != 1:
            raise LostLease(grid_id)

    # ---- one advance -----------------------------------------------------------------------------
    def _advance_held(self, grid_id: int, owner: str, only: set[str] | None) -> bool:
        """Returns True when every point's search is finished (n_trials jobs, all ended and told)."""
        with read_tx(self.engine) as conn:
            grid = conn.execute(select(t.grids.c.spec, t.grids.c.state, t.grids.c.created_at)
                                .where(t.grids.c.id == grid_id)).first()
        if grid is None:
            return True
        spec = GridSpec.model_validate(_loads(grid.spec))
        if spec.search is None:  # re-posted without a search: nothing more to ask
            return True
        search = spec.search
        parallel = search.parallel or self._live_workers()
        done = True
        for point_job in expand(spec):
            point = Point(point_job, study_name(grid_id, grid.created_at, point_job.key))
            if only is not None and point_job.key not in only:
                done &= self._point_done(grid_id, point, search, grid.state)
                continue
            study = self._study(grid_id, point, search)
            self._tell(grid_id, owner, point, study, search)
            self._adopt(grid_id, owner, spec, point, study)
            if grid.state == "active":
                self._ask(grid_id, owner, spec, point, study, parallel)
            done &= self._point_done(grid_id, point, search, grid.state)
        return done

    def _tell(self, grid_id: int, owner: str, point: Point, study, search: SearchSpec) -> None:
        """Tell the sampler each trial whose job ended (or that has no job); then mark it told."""
        from optuna.trial import TrialState

        st, jobs = t.search_trials, t.jobs
        with read_tx(self.engine) as conn:
            rows = conn.execute(
                select(st.c.id, st.c.number, jobs.c.state, jobs.c.result)
                .select_from(st.outerjoin(jobs, jobs.c.id == st.c.job_id))
                .where(st.c.grid_id == grid_id, st.c.point == point.job.key, st.c.told.is_(None),
                       (st.c.job_id.is_(None)) | (jobs.c.state.in_(ENDED)))
                .order_by(st.c.number)
            ).all()
        for row in rows:
            state, value = trial_state(row.state, _loads(row.result), search.metric)
            # skip_if_finished: told before a crash but not marked here; telling again changes nothing
            study.tell(row.number, value if state == "COMPLETE" else None, state=TrialState[state],
                       skip_if_finished=True)
            with write_tx(self.engine) as conn:
                self._fence(conn, grid_id, owner)
                conn.execute(update(st).where(st.c.id == row.id, st.c.told.is_(None)).values(told=state, value=value))

    def _adopt(self, grid_id: int, owner: str, spec: GridSpec, point: Point, study) -> None:
        """Trials the sampler handed out that never got a row here (the asker died in between) get one now."""
        from optuna.trial import TrialState

        with read_tx(self.engine) as conn:
            known = set(conn.execute(select(t.search_trials.c.number).where(
                t.search_trials.c.grid_id == grid_id, t.search_trials.c.point == point.job.key)).scalars())
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in known:
                complete = set(trial.params) == set(spec.search.space)  # a crash mid-ask leaves some out
                self._store(grid_id, owner, spec, point, trial.number, trial.params if complete else None)
        self._tell(grid_id, owner, point, study, spec.search)

    def _ask(self, grid_id: int, owner: str, spec: GridSpec, point: Point, study, parallel: int) -> None:
        search = spec.search
        distributions = _distributions(search)
        counted, in_flight = self._counts(grid_id, point)
        want = min(parallel - in_flight, search.n_trials - counted)
        duplicates = 0
        while want > 0 and duplicates < MAX_DUPLICATE_ASKS:
            trial = study.ask(distributions)
            stored = self._store(grid_id, owner, spec, point, trial.number, trial.params)
            if stored == "job":
                want -= 1
            else:  # a duplicate (told the known result now, if there is one) or over budget
                duplicates += 1
                self._tell(grid_id, owner, point, study, search)

    def _store(self, grid_id: int, owner: str, spec: GridSpec, point: Point, number: int,
               params: dict[str, Any] | None) -> str:
        """Tie trial `number` to a job in one transaction: a new job ("job"), the job of the same config
        ("duplicate"), or none ("none": over n_trials, or no usable params; the next _tell fails it)."""
        st = t.search_trials
        now = time.time()
        job = None
        if params is not None:
            try:
                config = with_params(point.job.config, params)
                job = JobSpec(key=job_key(spec.trainer, config, point.job.seed), config=config, seed=point.job.seed)
            except (GridError, TypeError, ValueError) as exc:
                log.warning("search of grid %s: trial %s has no usable config: %s", grid_id, number, exc)
        hooks = self._hooks(spec.trainer, job.config) if job is not None else (None, None)
        try:
            with write_tx(self.engine) as conn:
                self._fence(conn, grid_id, owner)
                row = {"grid_id": grid_id, "point": point.job.key, "number": number, "created_at": now,
                       "duplicate": False, "job_id": None}
                outcome = "none"
                if job is not None:
                    existing = conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid_id,
                                                                      t.jobs.c.key == job.key)).scalar()
                    counted = conn.execute(select(func.count()).select_from(st).where(
                        st.c.grid_id == grid_id, st.c.point == point.job.key, st.c.duplicate.is_(False),
                        st.c.job_id.is_not(None))).scalar_one()
                    if existing is not None:
                        row.update(job_id=existing, duplicate=True)
                        outcome = "duplicate"
                    elif counted < spec.search.n_trials:
                        row["job_id"] = conn.execute(insert(t.jobs).values(
                            job_row(spec, grid_id, job, now, *hooks)).returning(t.jobs.c.id)).scalar_one()
                        conn.execute(insert(t.events).values(
                            job_id=row["job_id"], time=now, kind="search_trial",
                            message=f"trial {number} of the {spec.search.sampler} search: {canonical_json(params)}"))
                        outcome = "job"
                conn.execute(insert(st).values(**row))
        except IntegrityError:  # another caller (one whose lease ran out) stored this trial first
            return "duplicate"
        return outcome

    def _hooks(self, trainer: str, config: dict[str, Any]) -> tuple[str | None, str | None]:
        external = self.external_id(trainer, config) if self.external_id else None
        fuse = self.fuse_key(trainer, config) if self.fuse_key else None
        return external, fuse

    def _counts(self, grid_id: int, point: Point) -> tuple[int, int]:
        """(jobs the point's search has made, of them not yet ended and told)."""
        st = t.search_trials
        own = and_(st.c.grid_id == grid_id, st.c.point == point.job.key, st.c.duplicate.is_(False),
                   st.c.job_id.is_not(None))
        with read_tx(self.engine) as conn:
            counted = conn.execute(select(func.count()).select_from(st).where(own)).scalar_one()
            in_flight = conn.execute(select(func.count()).select_from(st).where(own, st.c.told.is_(None))).scalar_one()
        return counted, in_flight

    def _point_done(self, grid_id: int, point: Point, search: SearchSpec, grid_state: str) -> bool:
        st = t.search_trials
        counted, _ = self._counts(grid_id, point)
        with read_tx(self.engine) as conn:
            untold = conn.execute(select(func.count()).select_from(st).where(
                st.c.grid_id == grid_id, st.c.point == point.job.key, st.c.told.is_(None))).scalar_one()
        return untold == 0 and (counted >= search.n_trials or grid_state == "cancelled")

    def _live_workers(self) -> int:
        since = time.time() - LIVE_WORKER_SECONDS
        with read_tx(self.engine) as conn:
            count = conn.execute(select(func.count()).select_from(t.workers).where(
                t.workers.c.last_seen_at >= since, t.workers.c.state != "stopped")).scalar_one()
        return max(1, count)

    # ---- Optuna ----------------------------------------------------------------------------------
    def _study(self, grid_id: int, point: Point, search: SearchSpec):
        import optuna

        st = t.search_trials
        with read_tx(self.engine) as conn:  # a fresh sampler seed per advance: the same seed would repeat draws
            asked = conn.execute(select(func.count()).select_from(st)
                                 .where(st.c.grid_id == grid_id, st.c.point == point.job.key)).scalar_one()
        sampler = _sampler(search, _seed(search.seed, point.job.key, asked))
        if asked:  # reading it is enough (create_study tries an INSERT first: a write on every advance)
            try:
                return optuna.load_study(storage=self.storage(), study_name=point.study_name, sampler=sampler)
            except KeyError:  # not there after all: create it below
                pass
        return optuna.create_study(storage=self.storage(), study_name=point.study_name, direction=search.direction,
                                   sampler=sampler, load_if_exists=True)

    def close(self) -> None:
        """Close Optuna's connections (the engine's own are the caller's)."""
        with self._storage_lock:
            if self._storage is not None:
                self._storage.engine.dispose()
                self._storage = None

    def storage(self):
        """Optuna's RDBStorage on our database (its own tables beside ours; docs/searches.md), made once."""
        with self._storage_lock:
            if self._storage is None:
                self._storage = _rdb_storage(self.engine)
            return self._storage


def _rdb_storage(engine: Engine):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per trial in the API's log
    url = engine.url.render_as_string(hide_password=False)
    if is_sqlite(engine):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30.0}}
    else:
        kwargs = {"pool_size": 2, "max_overflow": 8, "pool_pre_ping": True}
    # skip_compatibility_check: Optuna reads its schema version from `alembic_version`, which holds ours here.
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True)
        except SQLAlchemyError:
            if attempt == 2:  # two processes creating Optuna's tables at once: the loser retries, finds them
                raise
            time.sleep(0.2 * (attempt + 1))


def _seed(seed: int, point_key: str, asked: int) -> int:
    digest = hashlib.sha256(f"{seed}:{point_key}:{asked}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _sampler(search: SearchSpec, seed: int):
    import optuna

    samplers = optuna.samplers
    if search.sampler == "tpe":
        startup = 10 if search.startup_trials is None else search.startup_trials
        return samplers.TPESampler(seed=seed, constant_liar=search.constant_liar, n_startup_trials=startup)
    if search.sampler == "random":
        return samplers.RandomSampler(seed=seed)
    if search.sampler == "cmaes":
        startup = 1 if search.startup_trials is None else search.startup_trials
        return samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return samplers.GridSampler({key: param.values() for key, param in search.space.items()}, seed=seed)


def _distributions(search: SearchSpec) -> dict[str, Any]:
    from optuna import distributions as d

    out: dict[str, Any] = {}
    for key, p in search.space.items():
        if p.type == "float":
            out[key] = d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            out[key] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = d.CategoricalDistribution(p.choices)
    return out


# ---- what status, the API and the dashboard show ------------------------------------------------------
def search_summary(conn, grid_id: int, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Trials done / n_trials (all points together), in flight, and the best trial's value and config."""
    search = (spec or {}).get("search")
    if not search:
        return None
    st, jobs = t.search_trials, t.jobs
    points = max(1, conn.execute(select(func.count(st.c.point.distinct())).where(st.c.grid_id == grid_id))
                 .scalar_one())
    own = and_(st.c.grid_id == grid_id, st.c.duplicate.is_(False), st.c.job_id.is_not(None))
    made = conn.execute(select(func.count()).select_from(st).where(own)).scalar_one()
    told = conn.execute(select(func.count()).select_from(st).where(own, st.c.told.is_not(None))).scalar_one()
    state = conn.execute(select(t.searches.c.state).where(t.searches.c.grid_id == grid_id)).scalar()
    order = st.c.value.desc() if search.get("direction") == "maximize" else st.c.value.asc()
    best = conn.execute(
        select(st.c.value, st.c.job_id, st.c.number, jobs.c.config).join(jobs, jobs.c.id == st.c.job_id)
        .where(own, st.c.told == "COMPLETE", st.c.value.is_not(None)).order_by(order, st.c.id).limit(1)
    ).first()
    keys = list(search.get("space") or {})
    return {
        "sampler": search.get("sampler"), "metric": search.get("metric"), "direction": search.get("direction"),
        "n_trials": search.get("n_trials", 0) * points, "trials": made, "done": told, "in_flight": made - told,
        "state": state or "running",
        "best": None if best is None else {
            "value": best.value, "job_id": best.job_id, "trial": best.number,
            "params": {key: _get(_loads(best.config), key) for key in keys},
        },
    }


def _get(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def _loads(value):
    import json

    return json.loads(value) if isinstance(value, str) else value


class SearchLoop:
    """A daemon thread that advances every search every `interval` seconds: after a restart it finds trials
    asked but not stored and results not told, and it covers finishes whose hook lost the race for the lease.
    """

    def __init__(self, searches: Searches, interval: float):
        self.searches = searches
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gridfleet-search", daemon=True)

    def start(self) -> "SearchLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.searches.advance_all()
            except Exception as exc:  # noqa: BLE001 - a database outage must not end the loop
                _log_failure(exc, f"advancing searches failed; trying again in {self.interval:.0f} s")
            self._stop.wait(self.interval)


def _log_failure(exc: Exception, what: str) -> None:
    """A database that is down or restarting is expected (docs/database_outages.md): one line that names it.
    Anything else is a bug worth its traceback."""
    if is_unavailable(exc):
        log.warning("%s: the database is unavailable (%s)", what, type(exc).__name__)
    else:
        log.exception(what)
