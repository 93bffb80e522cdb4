"""The agent's gang path (worker/gang_run.py, worker/gang_child.py) with a real Agent, real child processes
(forked from its warm process, or spawned cold) and a real queue (SQLite, and Postgres where cheap): a gang
trains in one child, each member keeps its own result, metrics and checkpoints, and a member that leaves
(cancel, NaN, refused attempt) is finished alone while the others go on. The SIGTERM / kill -9 / segfault
cases with `gridfleet worker` processes are in tests/e2e/test_gang_workers.py."""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from common import schema as t
from common.checkpoints import LocalStore
from common.store_uri import job_folder
from scheduler.grids import cancel_job, submit_grid
from scheduler.policy import RetryPolicy
from scheduler.queue import Queue
from scheduler.spec import GridSpec
from worker.client import DirectClient
from worker.trainers import fuse_key, validate_config

DEADLINE = 90.0
TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. to be or not to be. "


@pytest.fixture
def fast_queue(engine):
    return Queue(engine, RetryPolicy(lease_seconds=20.0, backoff_base_seconds=0.05))


def _grid(engine, name: str, trainer: str, configs: list[dict], **fields) -> tuple[int, list[int]]:
    keys = sorted({k for c in configs for k in c})
    spec = GridSpec.model_validate({"name": name, "trainer": trainer,
                                    "zip": {k: [c.get(k) for c in configs] for k in keys}, **fields})
    grid_id = submit_grid(engine, spec, validate_config, fuse_key=fuse_key).grid_id
    with engine.connect() as conn:
        ids = [r.id for r in conn.execute(select(t.jobs.c.id).where(t.jobs.c.grid_id == grid_id).order_by(t.jobs.c.id))]
    return grid_id, ids


def _client(queue) -> DirectClient:
    return DirectClient(queue, heartbeat_seconds=0.2, max_gang_jobs=64)


def _jobs(engine, ids: list[int]) -> dict[int, dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(t.jobs).where(t.jobs.c.id.in_(ids))).mappings().all()
    return {r["id"]: dict(r) for r in rows}


def _attempts(engine, job_id: int) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(t.attempts).where(t.attempts.c.job_id == job_id)
                                              .order_by(t.attempts.c.started_at)).mappings()]


def _wait(check, what: str, timeout: float = DEADLINE):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _ended(engine, ids):
    jobs = _jobs(engine, ids)
    return jobs if all(j["state"] in ("succeeded", "failed", "cancelled") for j in jobs.values()) else None


def _metric_steps(engine, job_id: int) -> list[int]:
    with engine.connect() as conn:
        return sorted(r.step for r in conn.execute(select(t.metrics.c.step).where(t.metrics.c.job_id == job_id)))


def _gangs_in_log(home: Path) -> list[Path]:
    return sorted((home / "work").glob("gang-*"))


# ---- gated_rnn: a gang equals its members' solo runs -------------------------------------------------------
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_gated_rnn_gang_trains_in_one_child_and_each_member_equals_its_solo_run(db_url, engine, fast_queue,
                                                                                   tmp_path, start_agent):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 200)
    base = {"state_size": 8, "n_layers": 1, "batch_size": 4, "history": 12, "steps": 30, "corpus": str(corpus),
            "log_every": 5, "checkpoint_every": 10}
    flags = ("use_input_gate", "use_output_gate", "use_old_state", "use_forget_gate")
    members = [dict(zip(("lr", *flags), values)) for values in
               [(3e-3, False, False, False, True), (1e-3, True, True, False, True), (5e-3, False, False, True, False)]]
    gang_grid, gang_ids = _grid(engine, "fused", "gated_rnn", members, config=base)
    start_agent(_client(fast_queue), tmp_path / "fused", ["gated_rnn"], max_gang=8, grid_id=gang_grid)
    done = _wait(lambda: _ended(engine, gang_ids), "the gang to finish")
    assert [p.name for p in _gangs_in_log(tmp_path / "fused")] == [f"gang-{gang_ids[0]}"]  # one child for all

    for job_id, member in zip(gang_ids, members):
        fused = done[job_id]
        assert fused["state"] == "succeeded" and len(_attempts(engine, job_id)) == 1, fused
        solo, reports, solo_checkpoint = _solo_run(tmp_path / f"solo-{job_id}", fused, {**base, **member})
        assert fused["result"]["fused"] is True and "fused" not in solo
        for key in ("min_loss", "final_loss"):
            assert fused["result"][key] == pytest.approx(solo[key], rel=1e-5), key
        assert [s for s, _ in fused["result"]["loss_curve"]] == [s for s, _ in solo["loss_curve"]]
        for (_, x), (_, y) in zip(fused["result"]["loss_curve"], solo["loss_curve"]):
            assert x == pytest.approx(y, rel=1e-5)
        metrics = _metrics(engine, job_id)  # its own metrics, as the solo run reported them
        assert [step for step, _ in metrics] == [step for step, _ in reports] == list(range(5, 31, 5))
        for (_, x), (_, y) in zip(metrics, reports):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert fused["checkpoint"]["step"] == 30  # its own pointer, to its own file, in the solo format
        assert fused["checkpoint"]["uri"].endswith(f"{job_folder(gang_grid, job_id)}/ckpt-{30:012d}.pt")
        mine = LocalStore(tmp_path / "fused" / "checkpoints").load(fused["checkpoint"])
        for name, tensor in solo_checkpoint["model"].items():
            assert mine["model"][name].shape == tensor.shape, name
            assert (mine["model"][name] - tensor).abs().max().item() < 1e-4, name


def _solo_run(root: Path, job: dict, config: dict):
    """gated_rnn.train on the job's config and seed in this process: (result, reports, last checkpoint)."""
    from worker.context import TrainerContext
    from worker.trainers import gated_rnn

    receiver, sender = multiprocessing.Pipe(duplex=False)  # a few dozen messages: the pipe holds them
    store = LocalStore(root / "store")
    ctx = TrainerContext({"id": job["id"], "grid_id": job["grid_id"], "seed": job["seed"], "attempt": 1,
                          "checkpoint": None}, sender, multiprocessing.Event(), store, root)
    result = gated_rnn.train(gated_rnn.Config.model_validate(config), ctx)
    messages = []
    while receiver.poll(0):
        messages.append(receiver.recv())
    reports = [(m[1], m[2]) for m in messages if m[0] == "report"]
    last = [m[1] for m in messages if m[0] == "checkpoint"][-1]
    return result, reports, store.load(last)


def _metrics(engine, job_id: int) -> list[tuple[int, dict]]:
    with engine.connect() as conn:
        rows = conn.execute(select(t.metrics.c.step, t.metrics.c["values"]).where(t.metrics.c.job_id == job_id)
                            .order_by(t.metrics.c.step)).all()
    return [(step, values if isinstance(values, dict) else json.loads(values)) for step, values in rows]


# ---- noop: members that leave early ------------------------------------------------------------------------
def _noop_members(n: int, **special) -> list[dict]:
    members = [{"value": float(i + 1), "fuse_group": "g"} for i in range(n)]
    for index, extra in special.items():
        members[int(index[1:])].update(extra)
    return members


def test_a_cancelled_member_leaves_and_the_others_finish_unchanged(engine, fast_queue, tmp_path, start_agent):
    members = _noop_members(4)
    grid_id, ids = _grid(engine, "cancel", "noop", members, config={"steps": 40, "seconds": 3.0})
    start_agent(_client(fast_queue), tmp_path / "w1", ["noop"], max_gang=8, grid_id=grid_id)
    _wait(lambda: (_jobs(engine, [ids[1]])[ids[1]]["step"] or 0) >= 3, "the gang to train")
    assert cancel_job(engine, ids[1]) == "cancel_requested"
    cancelled = _wait(lambda: (j := _jobs(engine, [ids[1]])[ids[1]])["state"] == "cancelled" and j,
                      "the cancelled member to end")
    others = _jobs(engine, [ids[0], ids[2], ids[3]])
    assert all(j["state"] == "running" for j in others.values()), others  # finished alone: the rest train on
    done = _wait(lambda: _ended(engine, ids), "the gang to finish")
    assert cancelled["step"] < 40
    for i in (0, 2, 3):
        assert done[ids[i]]["state"] == "succeeded"
        assert done[ids[i]]["result"] == {"loss": (i + 1) / 40, "steps": 40}  # noop's solo result
        assert _metric_steps(engine, ids[i]) == list(range(1, 41))
        assert len(_attempts(engine, ids[i])) == 1
    assert [a["outcome"] for a in _attempts(engine, ids[1])] == ["cancelled"]
    assert len(_gangs_in_log(tmp_path / "w1")) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_nan_member_fails_alone_and_is_retried_alone(db_url, engine, fast_queue, tmp_path, start_agent):
    members = _noop_members(3, m2={"nan_at_step": 5})
    grid_id, ids = _grid(engine, "nan", "noop", members, config={"steps": 30, "seconds": 3.0}, max_attempts=2)
    start_agent(_client(fast_queue), tmp_path / "w1", ["noop"], max_gang=8, grid_id=grid_id)
    first_error = _wait(lambda: (a := _attempts(engine, ids[2])) and a[0]["outcome"] == "error" and a[0],
                        "the NaN member's first attempt to fail")
    others = _jobs(engine, ids[:2])
    assert all(j["state"] == "running" for j in others.values()), others  # failed alone, right away
    assert "loss is NaN at step 6" in first_error["error"]
    done = _wait(lambda: _ended(engine, ids), "the grid to finish")
    assert [done[i]["state"] for i in ids] == ["succeeded", "succeeded", "failed"]
    assert [a["outcome"] for a in _attempts(engine, ids[2])] == ["error", "error"]
    assert [len(_attempts(engine, i)) for i in ids[:2]] == [1, 1]
    # The retry came after the others had left the queue: it ran alone, as a solo job (no second gang).
    assert len(_gangs_in_log(tmp_path / "w1")) == 1
    assert (tmp_path / "w1" / "work" / f"job-{ids[2]}" / "output.log").exists()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_member_whose_attempt_is_taken_is_dropped_and_the_others_finish(db_url, engine, fast_queue, tmp_path,
                                                                          start_agent):
    grid_id, ids = _grid(engine, "stale", "noop", _noop_members(3), config={"steps": 30, "seconds": 3.0})
    start_agent(_client(fast_queue), tmp_path / "w1", ["noop"], max_gang=8, grid_id=grid_id, warm=False)  # cold
    _wait(lambda: (_jobs(engine, [ids[0]])[ids[0]]["step"] or 0) >= 3, "the gang to train")
    with engine.begin() as conn:  # as if its lease ran out and another worker took it
        conn.execute(update(t.jobs).where(t.jobs.c.id == ids[0]).values(attempt_id="someone-else"))
    done = _wait(lambda: _ended(engine, ids[1:]), "the other members to finish")
    assert [done[i]["result"] for i in ids[1:]] == [{"loss": 2 / 30, "steps": 30}, {"loss": 3 / 30, "steps": 30}]
    stale = _jobs(engine, [ids[0]])[ids[0]]
    assert stale["state"] == "running" and stale["attempt_id"] == "someone-else"  # nothing written over it
    assert _attempts(engine, ids[0])[0]["outcome"] == "running"  # never finished by the stale attempt


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_gang_of_a_trainer_without_train_many_runs_its_first_job_alone_and_releases_the_others(
        db_url, engine, fast_queue, tmp_path, start_agent, monkeypatch):
    from worker import trainers

    monkeypatch.delitem(trainers.FUSED, "noop")  # in the agent: noop keeps its fuse key, loses train_many
    grid_id, ids = _grid(engine, "unfused", "noop", _noop_members(3), config={"steps": 3, "seconds": 0.3,
                                                                              "checkpoint_every": 100})
    # gated_rnn still trains gangs, so the agent claims them; cold children import noop only
    start_agent(_client(fast_queue), tmp_path / "w1", ["noop", "gated_rnn"], max_gang=8, grid_id=grid_id, warm=False)
    done = _wait(lambda: _ended(engine, ids), "the grid to finish")
    assert [done[i]["state"] for i in ids] == ["succeeded"] * 3
    assert _gangs_in_log(tmp_path / "w1") == []  # no gang child: each ran alone
    assert [a["outcome"] for a in _attempts(engine, ids[0])] == ["succeeded"]
    for i in ids[1:]:  # released unstarted at once (no error budget), then run alone
        assert [a["outcome"] for a in _attempts(engine, i)][-1] == "succeeded"
        assert {a["outcome"] for a in _attempts(engine, i)} <= {"preempted", "succeeded"}
    assert any(a["outcome"] == "preempted" for i in ids[1:] for a in _attempts(engine, i))
    assert all(done[i]["errors"] == 0 for i in ids)


def test_gated_fused_tells_a_gang_ctx_the_moment_a_member_leaves(tmp_path):
    """The `ctx.leave` hook the agent finishes early members by, as gated_fused calls it (in this process)."""
    from worker.context import TrainerContext
    from worker.trainers import gated_fused, gated_rnn

    log: list[tuple] = []

    class GangCtx(TrainerContext):
        def report(self, step, **metrics):
            log.append(("report", self.job_id, step))

        def progress(self, done, total):
            pass

        def leave(self, outcome):
            log.append(("leave", self.job_id, type(outcome).__name__))

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 200)
    cfg = gated_rnn.Config.model_validate({"state_size": 8, "n_layers": 1, "batch_size": 4, "history": 12,
                                           "steps": 30, "corpus": str(corpus), "log_every": 1,
                                           "checkpoint_every": 1000})
    cfgs = [cfg, cfg.model_copy(update={"lr": 1e30})]  # past Config's limit, to force a NaN
    store = LocalStore(tmp_path / "store")
    ctxs = [GangCtx({"id": i, "grid_id": 1, "seed": i, "attempt": 1, "checkpoint": None}, None,
                    multiprocessing.Event(), store, tmp_path / f"w{i}") for i in range(2)]
    outcomes = gated_fused.train_many(cfgs, ctxs)
    assert isinstance(outcomes[1], gated_rnn.Diverged) and outcomes[0]["steps"] == 30
    left = log.index(("leave", 1, "Diverged"))
    assert ("report", 0, 30) in log[left:]  # told while member 0 still trained
