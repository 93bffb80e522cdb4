"""Gang claims at queue level (scheduler/gang.py), on SQLite and on Postgres: grouping by grid and fuse key,
K = 1 equals Queue.claim, per-member fencing of batched heartbeats and finishes, the single finish's rules
per member, bad batches refused before anything is written."""
from __future__ import annotations

import pytest
from sqlalchemy import select, update

from common import schema as t
from scheduler import reports
from scheduler.gang import GangError, MemberBeat, MemberFinish, claim_gang, finish_gang, heartbeat_gang
from scheduler.grids import pause_grid, submit_grid
from scheduler.queue import Metric
from scheduler.spec import GridSpec
from worker.trainers import fuse_key, validate_config


def _submit(engine, name: str, configs: list[dict], **fields):
    spec = GridSpec.model_validate({"name": name, "trainer": "noop", "zip": {"value": [c["value"] for c in configs],
                                    "fuse_group": [c.get("fuse_group") for c in configs]}, **fields})
    return submit_grid(engine, spec, validate_config, fuse_key=fuse_key).grid_id


def _keys(engine) -> dict[int, tuple[int, str | None]]:
    with engine.connect() as conn:
        return {r.id: (r.grid_id, r.fuse_key) for r in conn.execute(select(t.jobs.c.id, t.jobs.c.grid_id,
                                                                           t.jobs.c.fuse_key))}


def _row(engine, job_id: int):
    with engine.connect() as conn:
        return conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one()


def test_submit_stores_the_trainers_fuse_key(engine):
    _submit(engine, "g", [{"value": 1.0, "fuse_group": "a"}, {"value": 2.0}])
    assert sorted(_keys(engine).values(), key=str) == [(1, "noop:a"), (1, None)]


def test_a_gang_never_mixes_grids_or_fuse_keys_and_unkeyed_jobs_come_alone(queue, engine):
    a = _submit(engine, "a", [{"value": float(i), "fuse_group": ["x", "y", None][i % 3]} for i in range(12)])
    b = _submit(engine, "b", [{"value": float(i), "fuse_group": "x"} for i in range(5)])
    keys = _keys(engine)
    gangs = []
    while gang := claim_gang(queue, "w", max_jobs=3):
        gangs.append([job.id for job in gang])
    assert sorted(i for g in gangs for i in g) == sorted(keys)  # every job, once
    for gang in gangs:
        assert len({keys[i] for i in gang}) == 1, gang  # one grid, one key
        assert len(gang) <= 3
        if keys[gang[0]][1] is None:
            assert len(gang) == 1
    # Best first, as a single claim: grid a's jobs (older) before grid b's; full gangs while jobs last.
    assert [keys[g[0]][0] for g in gangs] == sorted(keys[g[0]][0] for g in gangs)
    sizes = {(grid, key): sorted(len(g) for g in gangs if keys[g[0]] == (grid, key))
             for grid, key in set(keys.values())}
    assert sizes == {(a, "noop:x"): [1, 3], (a, "noop:y"): [1, 3], (a, None): [1, 1, 1, 1], (b, "noop:x"): [2, 3]}


def _claim_both_ways(queue, engine, calls):
    """The job ids Queue.claim gives for `calls`, then (with every job queued again) claim_gang with K = 1."""
    singles = [getattr(queue.claim("w", **kw), "id", None) for kw in calls]
    with engine.begin() as conn:
        conn.execute(update(t.jobs).values(state="queued", attempt_id=None, worker_id=None, lease_expires_at=None,
                                           attempts=0, started_at=None))
        conn.execute(t.attempts.delete())
    gangs = [claim_gang(queue, "w", max_jobs=1, **kw) for kw in calls]
    assert all(len(g) <= 1 for g in gangs)
    return singles, [g[0].id if g else None for g in gangs], gangs


def test_k_1_claims_what_a_single_claim_claims(queue, engine):
    low = _submit(engine, "low", [{"value": float(i), "fuse_group": "x"} for i in range(3)])
    high = _submit(engine, "high", [{"value": float(i)} for i in range(2)], priority=5)
    pinned = _submit(engine, "pinned", [{"value": 1.0}], code_rev="abc123", priority=9)
    paused = _submit(engine, "paused", [{"value": 1.0}], priority=10)
    pause_grid(engine, paused)
    with engine.begin() as conn:  # one of `low`'s jobs backs off
        first_low = conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == low).order_by(t.jobs.c.id)).first()
        conn.execute(update(t.jobs).where(t.jobs.c.id == first_low.id).values(not_before=4e9))
    calls = [{"trainers": ["sleep"]}, {"grid_id": low}, {}, {"can_pin_code": True}, {}, {}, {}, {}]
    singles, firsts, gangs = _claim_both_ways(queue, engine, calls)
    assert singles == firsts
    assert singles[0] is None and singles[-1] is None  # nothing for a sleep-only worker; all taken at the end
    grids = {i: grid for i, (grid, _) in _keys(engine).items()}
    # The backed-off job is skipped, the pinned one waits for a worker that can pin, the paused grid waits.
    assert [grids.get(i) for i in singles[1:8]] == [low, high, pinned, high, low, None, None]
    job = gangs[2][0]
    assert (job.worker_id, job.attempt, job.trainer) == ("w", 1, "noop") and len(job.attempt_id) == 32
    with engine.connect() as conn:
        attempt = conn.execute(select(t.attempts).where(t.attempts.c.id == job.attempt_id)).mappings().one()
    assert (attempt["job_id"], attempt["worker_id"], attempt["outcome"]) == (job.id, "w", "running")


@pytest.fixture
def gang(queue, engine):
    queue.register_worker("w1", "h", ["noop"], worker_id="w1")
    queue.register_worker("w2", "h", ["noop"], worker_id="w2")
    _submit(engine, "g", [{"value": float(i), "fuse_group": "x"} for i in range(4)])
    jobs = claim_gang(queue, "w1", max_jobs=4)
    assert len(jobs) == 4 and len({j.attempt_id for j in jobs}) == 4
    return jobs


def test_each_member_has_its_own_attempt_fence_and_lease(queue, engine, gang):
    with engine.connect() as conn:
        rows = conn.execute(select(t.jobs).order_by(t.jobs.c.id)).mappings().all()
        attempts = conn.execute(select(t.attempts)).mappings().all()
    [worker] = [w for w in reports.list_workers(engine) if w["id"] == "w1"]  # state derived from its jobs
    assert [(r["state"], r["attempt_id"], r["worker_id"]) for r in rows] == [
        ("running", j.attempt_id, "w1") for j in gang]
    assert all(r["lease_expires_at"] == pytest.approx(gang[0].lease_expires_at) for r in rows)
    assert sorted((a["id"], a["job_id"]) for a in attempts) == sorted((j.attempt_id, j.id) for j in gang)
    assert (worker["state"], worker["current_job_id"]) == ("busy", gang[0].id)


def test_a_stale_member_is_refused_and_the_others_are_written(queue, engine, gang):
    stale = gang[1]
    with engine.begin() as conn:  # its lease alone ran out
        conn.execute(update(t.jobs).where(t.jobs.c.id == stale.id).values(lease_expires_at=1.0))
    taken = claim_gang(queue, "w2", max_jobs=4)
    assert [j.id for j in taken] == [stale.id]  # re-claimed by another worker; the rest stay w1's
    beats = [MemberBeat(j.id, j.attempt_id, step=5, progress=(5, 10), metrics=[Metric(5, {"loss": 0.1 * j.id})])
             for j in gang]
    replies = heartbeat_gang(queue, "w1", beats)
    assert [(r.ok, r.stop) for r in replies] == [(True, False), (False, True), (True, False), (True, False)]
    assert stale.attempt_id in replies[1].reason
    assert [_row(engine, j.id)["step"] for j in gang] == [5, None, 5, 5]
    with engine.connect() as conn:
        metric_jobs = sorted(conn.execute(select(t.metrics.c.job_id)).scalars())
    assert metric_jobs == sorted(j.id for j in gang if j is not stale)
    # Another worker cannot write for w1's members either, even with their attempt ids.
    assert [r.ok for r in heartbeat_gang(queue, "w2", beats)] == [False] * 4

    ends = [MemberFinish(j.id, j.attempt_id, "succeeded", result={"loss": j.id}) for j in gang]
    replies = finish_gang(queue, "w1", ends)
    assert [(r.ok, r.state) for r in replies] == [(True, "succeeded"), (False, None), (True, "succeeded"),
                                                  (True, "succeeded")]
    row = _row(engine, stale.id)
    assert (row["state"], row["attempt_id"], row["worker_id"], row["result"]) == ("running", taken[0].attempt_id,
                                                                                  "w2", None)
    assert finish_gang(queue, "w2", [MemberFinish(stale.id, taken[0].attempt_id, "succeeded",
                                                  result={"loss": 9})])[0].ok
    assert [_row(engine, j.id)["result"] for j in gang] == [{"loss": gang[0].id}, {"loss": 9}, {"loss": gang[2].id},
                                                            {"loss": gang[3].id}]
    ends = [(j.id, e["kind"]) for j in gang for e in reports.job_events(engine, j.id) if e["kind"] == "succeeded"]
    assert sorted(job_id for job_id, _ in ends) == sorted(j.id for j in gang)  # each finished once
    assert {w["id"]: w["state"] for w in reports.list_workers(engine)} == {"w1": "idle", "w2": "idle"}


def test_members_follow_the_single_finishs_rules(queue, engine, gang):
    outcomes = ["succeeded", "error", "preempted", "cancelled"]
    replies = finish_gang(queue, "w1", [MemberFinish(j.id, j.attempt_id, o, result={"loss": 1.0} if o == "succeeded"
                                                     else None, error="boom" if o == "error" else None)
                                        for j, o in zip(gang, outcomes)], now=1000.0)
    assert [r.state for r in replies] == ["succeeded", "queued", "queued", "cancelled"]
    rows = [_row(engine, j.id) for j in gang]
    assert [(r["errors"], r["preemptions"]) for r in rows] == [(0, 0), (1, 0), (0, 1), (0, 0)]
    assert rows[1]["not_before"] == pytest.approx(1000.0 + queue.policy.backoff("error", 1))
    assert rows[1]["last_error"] == "boom" and rows[2]["not_before"] == 1000.0
    assert all(r["attempt_id"] is None and r["worker_id"] is None and r["lease_expires_at"] is None for r in rows)
    with engine.connect() as conn:
        ended = dict(conn.execute(select(t.attempts.c.job_id, t.attempts.c.outcome)).all())
    assert [ended[j.id] for j in gang] == outcomes
    # Finishing again is refused: each attempt ended once.
    again = finish_gang(queue, "w1", [MemberFinish(j.id, j.attempt_id, "succeeded") for j in gang])
    assert not any(r.ok for r in again)


def test_worker_stays_busy_while_members_remain(queue, engine, gang):
    finish_gang(queue, "w1", [MemberFinish(gang[0].id, gang[0].attempt_id, "succeeded")])
    [worker] = [w for w in reports.list_workers(engine) if w["id"] == "w1"]
    assert (worker["state"], worker["current_job_id"]) == ("busy", gang[1].id)


def test_bad_batches_are_refused_before_anything_is_written(queue, engine, gang):
    for k in (0, -1, 1.5, True):
        with pytest.raises(GangError) as err:
            claim_gang(queue, "w2", max_jobs=k)
        assert err.value.field == "max_jobs"
    bad = [([], "members"), ([MemberBeat(gang[0].id, gang[0].attempt_id)] * 2, "members.1.job_id"),
           ([MemberBeat(gang[0].id, gang[0].attempt_id), MemberBeat(999_999, "x")], "members.1.job_id")]
    for members, field in bad:
        with pytest.raises(GangError) as err:
            heartbeat_gang(queue, "w1", members)
        assert err.value.field == field
    with pytest.raises(GangError) as err:
        finish_gang(queue, "w1", [MemberFinish(gang[0].id, gang[0].attempt_id, "done")])
    assert err.value.field == "members.0.outcome"
    assert _row(engine, gang[0].id)["state"] == "running"


def test_an_expired_member_nobody_claimed_regains_its_job(queue, engine, gang):
    with engine.begin() as conn:
        conn.execute(update(t.jobs).where(t.jobs.c.id == gang[2].id).values(lease_expires_at=1.0))
    assert queue.requeue_expired() == 1
    replies = heartbeat_gang(queue, "w1", [MemberBeat(j.id, j.attempt_id) for j in gang])
    assert all(r.ok for r in replies)
    assert _row(engine, gang[2].id)["attempt_id"] == gang[2].attempt_id


def test_another_workers_batch_changes_nothing(queue, engine, gang):
    from tests.integration.test_worker_binding import snapshot

    before = snapshot(engine)
    outcomes = ["succeeded", "error", "preempted", "cancelled"]  # both Postgres finish paths
    beats = heartbeat_gang(queue, "w2", [MemberBeat(j.id, j.attempt_id, step=9, metrics=[Metric(9, {"x": 1})])
                                         for j in gang])
    ends = finish_gang(queue, "w2", [MemberFinish(j.id, j.attempt_id, o, error="x") for j, o in zip(gang, outcomes)])
    for reply in beats + ends:
        assert (reply.ok, reply.stop) == (False, True) and "w2" in reply.reason
    assert snapshot(engine) == before
