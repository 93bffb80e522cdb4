"""Early stopping through the real queue on SQLite and Postgres (scheduler/pruning.py): ASHA decisions from
heartbeat metrics against the published rule, racing heartbeats at one rung, the pruned state, gang replies,
resume by hand from the checkpoint, the median and threshold rules, and bad prune specs as 422s."""
from __future__ import annotations

import secrets
import threading

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from api.app import create_app
from common import schema as t
from common.settings import Settings
from scheduler import gang, grids, pruning, reports
from scheduler.queue import Metric, Queue
from scheduler.spec import GridSpec
from worker import trainers
from worker.trainers import curve

ETA = 3


def asha_promotes(value: float, earlier: list[float], eta: int = ETA) -> bool:
    """The published asynchronous successive-halving rule (Li et al. 2020): promote when the value is in the
    top 1/eta of the values recorded at the rung so far (itself included); with fewer than eta values, only
    the best is promoted (Optuna's choice, as it cannot pause a trial). Written here apart from the code."""
    values = sorted([*earlier, value])
    return value <= values[max(len(values) // eta, 1) - 1]


def submit(queue: Queue, name: str, xs: list[float], prune: dict, steps: int = 18, **config) -> list[int]:
    spec = GridSpec(name=name, trainer="curve", objective="min:loss", config={"steps": steps, **config},
                    axes={"x": xs}, prune=prune)
    grids.submit_grid(queue.engine, spec, trainers.validate_config)
    with queue.engine.connect() as conn:
        return list(conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == select(t.grids.c.id).where(
            t.grids.c.name == name).scalar_subquery()).order_by(t.jobs.c.id)).scalars())


def claim_all(queue: Queue, n: int, worker: str) -> dict[int, object]:
    claimed = {}
    for _ in range(n):
        job = queue.claim(worker, trainers=["curve"])
        claimed[job.id] = job
    return claimed


def beat(queue: Queue, job, steps: range):
    cfg = curve.Config.model_validate(job.config)
    metrics = [Metric(step=s, values={"loss": curve.loss_at(cfg, s)}) for s in steps]
    return queue.heartbeat(job.id, job.attempt_id, step=steps[-1], metrics=metrics, worker_id=job.worker_id)


def rungs(engine) -> list:
    with engine.connect() as conn:
        return conn.execute(select(t.prune_rungs).order_by(t.prune_rungs.c.id)).all()


def check_against_rule(engine) -> None:
    """Every recorded decision is the rule applied to the values recorded at its rung before it."""
    seen: dict[int, list[float]] = {}
    for row in rungs(engine):
        assert row.promoted == asha_promotes(row.value, seen.get(row.rung, [])), (row, seen)
        seen.setdefault(row.rung, []).append(row.value)


def test_asha_prunes_what_the_rule_says_at_the_rung_steps(queue):
    xs = [0.3 + d for d in (0.9, 0.1, 0.5, 0.0, 0.7, 0.3, 1.1, 0.2, 0.4)]  # the 4th (x = 0.3) is the best
    ids = submit(queue, "asha", xs, {"rule": "asha", "min_steps": 2, "reduction_factor": ETA, "max_resource": 18})
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = claim_all(queue, len(ids), worker)
    order = list(jobs)  # heartbeats arrive in claim order: each job reports steps 1..3 (rung 0 is step 2)
    replies = {job_id: beat(queue, jobs[job_id], range(1, 4)) for job_id in order}
    values = {job_id: curve.loss_at(curve.Config.model_validate(jobs[job_id].config), 2) for job_id in order}
    expected = {job_id: not asha_promotes(values[job_id], [values[j] for j in order[:i]])
                for i, job_id in enumerate(order)}
    assert {j: r.prune for j, r in replies.items()} == expected
    assert any(expected.values()) and not all(expected.values())
    check_against_rule(queue.engine)
    for job_id, reply in replies.items():
        assert reply.ok and not reply.stop and not reply.cancel
        if reply.prune:
            assert "rung 0 (step 2)" in reply.reason and reply.reason.startswith("asha: loss")
    # A pruned job is told again on its next beat; the survivors go on to rung 1 (step 6).
    pruned = [j for j in order if expected[j]]
    again = beat(queue, jobs[pruned[0]], range(4, 5))
    assert again.prune and again.reason == replies[pruned[0]].reason
    survivors = [j for j in order if not expected[j]]
    for job_id in survivors:
        beat(queue, jobs[job_id], range(4, 8))
    check_against_rule(queue.engine)
    # max_resource 18: rung 2 would be at step 18, the end: no decision there, however far a job reports.
    late = [beat(queue, jobs[job_id], range(8, 21)) for job_id in survivors]
    assert {r.rung for r in rungs(queue.engine)} == {0, 1}
    kept = {r.job_id for r in rungs(queue.engine) if r.rung == 1 and r.promoted}
    assert ids[3] in kept and not any(r.prune for j, r in zip(survivors, late) if j in kept)
    best = ids[3]
    assert all(r.promoted for r in rungs(queue.engine) if r.job_id == best)
    # The worker stops a pruned job and finishes it as pruned: its own state, step and rule, in the results.
    victim = jobs[pruned[0]]
    assert queue.finish(victim.id, victim.attempt_id, "pruned", worker_id=worker).state == "pruned"
    rows = {r["job_id"]: r for r in reports.grid_results(queue.engine, "asha")}
    assert rows[victim.id]["state"] == "pruned"
    assert rows[victim.id]["pruned"] == {"step": 2, "by": replies[victim.id].reason, "rung": 0}
    assert reports.grid_summary(queue.engine, "asha")["counts"]["pruned"] == 1
    columns, flat = reports.results_table(list(rows.values()))
    assert "pruned_at_step" in columns and [f["pruned_at_step"] for f in flat if f["state"] == "pruned"] == [2]
    kinds = [e["kind"] for e in reports.job_events(queue.engine, victim.id)]
    assert kinds.count("prune") == 1 and kinds[-1] == "pruned"
    # Not claimable: nothing is left to claim (every other job is running).
    assert queue.claim(worker, trainers=["curve"]) is None


def test_racing_heartbeats_at_one_rung_decide_one_at_a_time(queue):
    """Twelve jobs reach rung 0 at once from twelve threads (their own connections), through three Queues
    (as three API processes: each keeps its own copy of the rungs): each decision sees every value recorded
    before it, so the log replays exactly under the rule, and the best is kept."""
    xs = [0.3 + 0.05 * i for i in range(12)]
    submit(queue, "race", xs, {"rule": "asha", "min_steps": 3, "reduction_factor": ETA})
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = list(claim_all(queue, len(xs), worker).values())
    start = threading.Barrier(len(jobs))
    replies = {}
    queues = [queue, Queue(queue.engine, queue.policy), Queue(queue.engine, queue.policy)]

    def run(job, via):
        start.wait()
        replies[job.id] = beat(via, job, range(1, 5))

    threads = [threading.Thread(target=run, args=(job, queues[i % 3])) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for other in queues[1:]:
        other.close()
    recorded = rungs(queue.engine)
    assert len(recorded) == len(jobs) and {r.rung for r in recorded} == {0} and {r.step for r in recorded} == {3}
    check_against_rule(queue.engine)
    assert {r.job_id for r in recorded if not r.promoted} == {j for j, r in replies.items() if r.prune}
    best = min(jobs, key=lambda j: j.config["x"])
    assert not replies[best.id].prune


def test_gang_members_get_their_own_prune_answers(queue):
    submit(queue, "gang", [0.3, 1.3, 2.3], {"rule": "threshold", "upper": 2.0, "min_steps": 2})
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = list(claim_all(queue, 3, worker).values())
    members = []
    for job in jobs:
        cfg = curve.Config.model_validate(job.config)
        members.append(gang.MemberBeat(job.id, job.attempt_id, step=2,
                                       metrics=[Metric(step=s, values={"loss": curve.loss_at(cfg, s)}) for s in (1, 2)]))
    replies = gang.heartbeat_gang(queue, worker, members)
    # losses at step 2: 0.71, 1.71, 4.71: only the last is above upper 2.0
    assert [r.prune for r in replies] == [False, False, True]
    assert "above upper 2" in replies[2].reason
    done = gang.finish_gang(queue, worker, [gang.MemberFinish(jobs[2].id, jobs[2].attempt_id, "pruned")])
    assert done[0].state == "pruned"


def test_a_pruned_job_resumed_by_hand_continues_from_its_checkpoint_and_is_not_pruned_again(queue):
    submit(queue, "resume", [0.3, 1.3], {"rule": "threshold", "upper": 1.5, "min_steps": 2})
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = claim_all(queue, 2, worker)
    bad = next(j for j in jobs.values() if j.config["x"] == 1.3)
    assert beat(queue, bad, range(1, 3)).prune
    pointer = {"uri": "local:x", "step": 3, "time": 1.0}
    assert queue.set_checkpoint(bad.id, bad.attempt_id, pointer, worker_id=worker).ok
    assert queue.finish(bad.id, bad.attempt_id, "pruned", worker_id=worker).state == "pruned"
    with pytest.raises(grids.Conflict):
        grids.resume_job(queue.engine, next(j for j in jobs if j != bad.id))  # running: nothing to resume
    assert grids.resume_job(queue.engine, bad.id) == "queued"
    again = queue.claim(worker, trainers=["curve"])
    assert again.id == bad.id and again.checkpoint == pointer and again.attempt == 2
    later = beat(queue, again, range(4, 9))
    assert later.ok and not later.prune
    detail = reports.job_detail(queue.engine, bad.id)
    assert detail["prune_exempt"] and detail["pruned_by"] is None
    assert "no prune rule stops it again" in reports.job_events(queue.engine, bad.id)[-1]["message"]


def test_median_rule_against_succeeded_jobs_at_the_same_step(queue):
    xs = [0.3, 0.4, 0.5, 1.5, 0.35]
    ids = submit(queue, "median", xs, {"rule": "median", "n_startup_trials": 3, "min_steps": 2}, steps=6)
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = claim_all(queue, len(xs), worker)
    for job_id in ids[:3]:  # three run to the end before the others report
        assert not beat(queue, jobs[job_id], range(1, 7)).prune
        assert queue.finish(job_id, jobs[job_id].attempt_id, "succeeded", result={"loss": 1.0},
                            worker_id=worker).ok
    bad, good = jobs[ids[3]], jobs[ids[4]]
    assert not beat(queue, bad, range(1, 2)).prune  # step 1 < warm-up (min_steps 2)
    reply = beat(queue, bad, range(2, 4))
    assert reply.prune and reply.reason.startswith("median: best loss") and "3 succeeded jobs" in reply.reason
    assert reports.job_detail(queue.engine, bad.id)["pruned_step"] == 2
    assert not beat(queue, good, range(1, 7)).prune  # better than the median (x=0.4) at every step


def test_threshold_rule_and_grids_without_rules(queue):
    submit(queue, "thr", [0.3, 3.3], {"rule": "threshold", "upper": 2.0, "n_warmup_steps": 3})
    spec = GridSpec(name="plain", trainer="curve", axes={"x": [5.0]})
    grids.submit_grid(queue.engine, spec, trainers.validate_config)
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = claim_all(queue, 3, worker)
    by_x = {(j.config["x"], j.grid_id): j for j in jobs.values()}
    far = next(j for (x, _), j in by_x.items() if x == 3.3)
    assert not beat(queue, far, range(1, 3)).prune  # warm-up: no decision before step 3
    reply = beat(queue, far, range(3, 4))
    assert reply.prune and reply.reason == f"threshold: loss {curve.loss_at(curve.Config(x=3.3), 3):.6g} at step 3 " \
                                           "is above upper 2"
    plain = next(j for (x, _), j in by_x.items() if x == 5.0)
    assert not beat(queue, plain, range(1, 20)).prune  # no rule: never pruned, however bad
    near = next(j for (x, _), j in by_x.items() if x == 0.3)
    assert not beat(queue, near, range(1, 10)).prune
    # A rule on a metric the trainer never reports never prunes.
    spec = GridSpec(name="other", trainer="curve", axes={"x": [9.0]}, prune={"rule": "threshold", "metric": "acc",
                                                                              "lower": 0.5})
    grids.submit_grid(queue.engine, spec, trainers.validate_config)
    job = queue.claim(worker, trainers=["curve"])
    assert not beat(queue, job, range(1, 10)).prune


def test_the_rule_is_read_from_the_prune_member_of_the_spec_alone(queue):
    """The Pruner refreshes a grid's rule every RULE_CACHE_SECONDS from the spec's `prune` member, which the
    database extracts: a grid's whole spec (its axes) can be a megabyte of JSON."""
    rule = {"rule": "asha", "min_steps": 2, "reduction_factor": 3, "max_resource": 54}
    ids = submit(queue, "wide", [float(i) for i in range(3000)], rule)
    grids.submit_grid(queue.engine, GridSpec(name="ruleless", trainer="curve", axes={"x": [5.0]}),
                      trainers.validate_config)
    with queue.engine.connect() as conn:
        wide, ruleless = (conn.execute(select(t.grids.c.id).where(t.grids.c.name == name)).scalar_one()
                          for name in ("wide", "ruleless"))
        stored = pruning._loads(conn.execute(select(t.grids.c.spec).where(t.grids.c.id == wide)).scalar_one())
        member = pruning._loads(conn.execute(pruning.prune_member(wide)).scalar())
        nothing = pruning._loads(conn.execute(pruning.prune_member(ruleless)).scalar())
    assert len(stored["axes"]["x"]) == 3000 and member == stored["prune"] and member["rule"] == "asha"
    assert nothing is None
    pruner = pruning.Pruner(queue.engine)
    assert pruner.judge_steps(wide, ids[0]) == [2, 6, 18]  # the rungs below max_resource 54
    assert pruner.judge_steps(ruleless, ids[0]) == []


@pytest.mark.parametrize("prune, field, words", [
    ({"rule": "bohb"}, "grid.prune.rule", "hyperband"),  # not a rule: the message lists the rules
    ({"rule": "hyperband"}, "grid.prune", "max_resource: the hyperband rule needs it"),
    ({"rule": "asha", "reduction_factor": 1}, "grid.prune.reduction_factor", "greater than or equal to 2"),
    ({"rule": "threshold", "metric": "loss"}, "grid.prune", "lower/upper"),
    ({"rule": "asha", "metric": "loss", "upper": 3}, "grid.prune", "upper: for the threshold rule only"),
    ({"rule": "asha", "min_steps": 0}, "grid.prune.min_steps", "greater than or equal to 1"),
    ({"rule": "median", "metric": "loss", "mode": "up"}, "grid.prune.mode", "min"),
    ({"rule": "asha", "min_steps": 10, "max_resource": 5}, "grid.prune", "max_resource"),
    ({"rule": "asha", "metric": "loss", "grace": 3}, "grid.prune.grace", "Extra inputs"),
])
def test_bad_prune_specs_are_422s_naming_the_field(db_url, prune, field, words):
    token = "gf_prune_admin_" + secrets.token_hex(16)
    app = create_app(Settings(database_url=db_url, admin_token=token))
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as http:
        grid = {"name": "bad", "trainer": "curve", "objective": "min:loss", "prune": prune}
        if "metric" in prune:
            grid.pop("objective")
        reply = http.post("/api/v1/grids", json=grid)
        assert reply.status_code == 422, reply.text
        fields = reply.json()["error"]["fields"]
        assert any(f["field"].endswith(field.removeprefix("grid.")) and words in f["message"] for f in fields), fields
        no_metric = http.post("/api/v1/grids", json={"name": "bad2", "trainer": "curve", "prune": {"rule": "asha"}})
        assert no_metric.status_code == 422 and "metric" in no_metric.text
        good = http.post("/api/v1/grids", json={"name": "ok", "trainer": "curve", "objective": "max:acc",
                                                 "prune": {"rule": "median"}})
        assert good.status_code == 201, good.text
        stored = http.get("/api/v1/grids/ok").json()["spec"]["prune"]
        assert (stored["metric"], stored["mode"]) == ("acc", "max")
        assert http.post("/api/v1/jobs/1/resume").status_code == 409  # queued: nothing to resume
        assert http.post("/api/v1/jobs/99999/resume").status_code == 404
    app.state.queue.close()
    app.state.engine.dispose()


def test_status_dashboard_and_resume_job_cli_show_and_resume_a_pruned_job(queue, db_url, monkeypatch):
    from typer.testing import CliRunner

    from api.dashboard import views
    from cli.main import app

    submit(queue, "shown", [0.3, 0.4, 0.5, 3.3], {"rule": "asha", "min_steps": 2, "reduction_factor": ETA})
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = claim_all(queue, 4, worker)
    replies = {job_id: beat(queue, job, range(1, 4)) for job_id, job in jobs.items()}
    victim = next(j for j, r in replies.items() if r.prune)
    assert queue.finish(victim, jobs[victim].attempt_id, "pruned", worker_id=worker).ok
    view = views.grid_view(queue.engine, "shown")
    row = next(r for r in view["rows"] if r["job_id"] == victim)
    assert row["pruned"]["step"] == 2 and row["pruned"]["rung"] == 0 and row["latest"]["loss"] > 0
    assert view["grid"]["counts"]["pruned"] == 1
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.delenv("GRIDFLEET_SERVER_URL", raising=False)
    shown = CliRunner().invoke(app, ["status", "shown", "--local"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "pruned@2 rung 0" in shown.output, shown.output
    resumed = CliRunner().invoke(app, ["resume-job", str(victim), "--local"])
    assert resumed.exit_code == 0 and "queued" in resumed.output, resumed.output
    again = CliRunner().invoke(app, ["resume-job", str(victim), "--local"])
    assert again.exit_code == 1 and "only pruned or cancelled jobs" in again.output, again.output
