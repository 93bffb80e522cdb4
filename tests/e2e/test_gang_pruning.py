"""A pruned gang member leaves its gang as a cancelled one does (issue 18): `gridfleet serve` and ONE
`gridfleet worker --gang 6` train a grid of six known curves (the curve trainer, one fuse group) as one gang
in one child, under an ASHA rule. The members the rule stops end `pruned` at their rung while their
gang-mates train on and succeed with their solo results; no member is finished twice; `gridfleet status`
shows them as it shows solo pruned jobs; and two pruned members resumed by hand (`gridfleet resume-job`)
are trained as a gang again, each from its own checkpoint step (docs/early_stopping.md, docs/gang_claims.md).
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.processes import DEADLINE, attempt_steps, gridfleet_cmd, job, ok
from tests.integration.test_pruning import asha_promotes
from tests.trainers.harness import Harness
from worker.trainers import curve

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open") or not Path("/proc/self/stat").exists(),
                                reason="warm starts need Linux pidfds and /proc")

STEPS, MIN_STEPS, ETA = 18, 2, 3  # rungs at steps 2 and 6; 18 is the end (max_resource)
# In claim order (the order a lockstep gang's members reach a rung): 0.3 and 0.0 go on to the end, 0.5, 0.7
# and 0.6 stop at rung 0, and 0.1 (second best of six at rung 0) stops at rung 1 behind the best, 0.0.
OFFSETS = (0.3, 0.0, 0.5, 0.7, 0.6, 0.1)
BASE = {"steps": STEPS, "step_seconds": 0.15, "checkpoint_every": 100, "fuse_group": "g"}  # saved as it stops


def _solo(tmp_path: Path, config: dict, from_step: int = 0) -> tuple[dict, list[int]]:
    """curve.train alone in this process (from a checkpoint at `from_step`): its result and reported steps,
    which the member's must equal. (The member's own file may be rotated away by now: curve's is its step.)"""
    from common.checkpoints import LocalStore

    root = tmp_path / f"solo-{len(list(tmp_path.glob('solo-*')))}"
    pointer = LocalStore(root / "store", keep=100).save(1, 7, from_step, {"step": from_step}) if from_step else None
    harness = Harness(root, checkpoint=pointer)
    result = harness.train(curve, {**config, "step_seconds": 0.0})
    return result, [s for s, _ in harness.reports]


def _status(fleet, server, grid: str) -> str:
    out = subprocess.run([*gridfleet_cmd(), "status", grid, "--server", server.url],
                         env=fleet.env(GRIDFLEET_TOKEN=server.admin_token, COLUMNS="200"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    return out.stdout


@pytest.mark.parametrize("db_url", ["sqlite", "postgres"], indirect=True)
def test_pruned_gang_members_leave_while_their_gang_mates_finish_then_resume_as_a_gang(db_url, fleet, tmp_path):
    server = fleet.start_server(db_url)
    api = server.api
    xs = [round(0.3 + d, 6) for d in OFFSETS]
    ok(api.post("/grids", json={
        "name": "gang-asha", "trainer": "curve", "objective": "min:loss", "config": BASE, "axes": {"x": xs},
        "prune": {"rule": "asha", "min_steps": MIN_STEPS, "reduction_factor": ETA, "max_resource": STEPS}}))
    ids = sorted(r["job_id"] for r in ok(api.get("/grids/gang-asha/results"))["results"])
    home = fleet.tmp / "w1-home"
    env = fleet.env(GRIDFLEET_HOME=str(home), GRIDFLEET_TOKEN=server.worker_token)
    worker = fleet.spawn("w1", [*gridfleet_cmd(), "worker", "--server", server.url, "--name", "w1", "--grace", "30",
                                "--trainers", "curve", "--gang", "6"], env)

    def ended(job_ids):
        details = [job(api, i) for i in job_ids]
        return details if all(d["state"] not in ("queued", "running") for d in details) else None

    by_id = {d["id"]: d for d in fleet.wait_for(lambda: ended(ids), "every member to end")}
    context = f"\n{by_id}\n{fleet.explain()}"
    assert sorted(p.name for p in (home / "work").glob("gang-*")) == [f"gang-{ids[0]}"], context  # one child
    assert worker.log_path.read_text().count("gang of 6 curve jobs") == 1, context

    # The decisions replay under the published rule, in the order they were made: the members' order.
    decisions = ok(api.get("/grids/gang-asha/rungs"))["rungs"]
    seen: dict[int, list[float]] = {}
    for d in decisions:
        cfg = curve.Config.model_validate(by_id[d["job_id"]]["config"])
        step = MIN_STEPS * ETA ** d["rung"]
        assert d["step"] == step and d["value"] == pytest.approx(curve.loss_at(cfg, step)), (d, context)
        assert d["promoted"] == asha_promotes(d["value"], seen.get(d["rung"], [])), (d, seen, context)
        seen.setdefault(d["rung"], []).append(d["value"])
    for rung in (0, 1):  # lockstep members reach a rung in their order, and one beat carries them in it
        order = [d["job_id"] for d in decisions if d["rung"] == rung]
        assert order == sorted(order), (rung, order, context)
    stopped = {d["job_id"]: d for d in decisions if not d["promoted"]}
    pruned = {i for i, d in by_id.items() if d["state"] == "pruned"}
    assert pruned == set(stopped), context  # exactly the members the rule stopped
    assert {d["rung"] for d in stopped.values()} == {0, 1}, context  # at both rungs
    assert len(pruned) == 4, context  # as OFFSETS says when the rungs fill in the members' order
    finished_at = {i: d["attempt_history"][-1]["ended_at"] for i, d in by_id.items()}
    for i in ids:
        assert [a["outcome"] for a in by_id[i]["attempt_history"]] == ["pruned" if i in pruned else "succeeded"]
        assert by_id[i]["attempts"] == 1, context  # no member finished (or claimed) twice
    for i, d in stopped.items():
        detail = by_id[i]
        assert detail["pruned"]["step"] == d["step"] and detail["pruned"]["rung"] == d["rung"], context
        assert d["step"] <= detail["checkpoint"]["step"] < STEPS, context  # stopped early, checkpointed
        # It left while its gang-mates trained on: finished before every one of them.
        assert finished_at[i] < min(finished_at[j] for j in ids if j not in pruned), context
    for i in set(ids) - pruned:
        solo, steps = _solo(tmp_path, by_id[i]["config"])
        assert by_id[i]["result"] == solo and solo["resumed_from"] == 0, context  # its solo run's result
        assert attempt_steps(api, i, by_id[i]["attempt_history"][-1]["id"]) == steps == list(range(1, STEPS + 1))
    best = min(ids, key=lambda i: curve.final(curve.Config.model_validate(by_id[i]["config"])))
    assert by_id[best]["state"] == "succeeded", context

    # `gridfleet status` shows a gang's pruned member as a solo one: pruned@STEP rung K, and the count.
    status = _status(fleet, server, "gang-asha")
    for i in pruned:
        assert f"pruned@{by_id[i]['pruned']['step']} rung {by_id[i]['pruned']['rung']}" in status, status
    assert status.count("pruned@") == len(pruned), status
    rows = ok(api.get("/grids/gang-asha/results"))["results"]  # and the results: ranked after the succeeded
    assert [r["state"] for r in rows] == ["succeeded"] * 2 + ["pruned"] * 4, rows
    assert all(r["pruned"] == by_id[r["job_id"]]["pruned"] for r in rows[2:]), rows

    # Resume one member pruned at each rung by hand: claimed as a gang of two, each from its own checkpoint.
    again = sorted(next(i for i, d in stopped.items() if d["rung"] == rung) for rung in (0, 1))
    ckpt = {i: by_id[i]["checkpoint"]["step"] for i in again}
    ok(api.post("/grids/gang-asha/pause"))  # so the idle worker cannot claim the first before the second is back
    for i in again:
        out = subprocess.run([*gridfleet_cmd(), "resume-job", str(i), "--server", server.url],
                             env=fleet.env(GRIDFLEET_TOKEN=server.admin_token), capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "queued" in out.stdout, out
    ok(api.post("/grids/gang-asha/resume"))
    done = {d["id"]: d for d in fleet.wait_for(lambda: ended(again), "the resumed members to end")}
    context = f"\n{done}\n{fleet.explain()}"
    assert (home / "work" / f"gang-{again[0]}").is_dir(), context
    assert worker.log_path.read_text().count("gang of 2 curve jobs") == 1, context  # not one by one
    for i in again:
        d = done[i]
        assert d["state"] == "succeeded" and d["prune_exempt"] and d["pruned_by"] is None, context
        solo, steps = _solo(tmp_path, d["config"], from_step=ckpt[i])
        assert d["result"] == solo and d["result"]["resumed_from"] == ckpt[i], context
        assert attempt_steps(api, i, d["attempt_history"][-1]["id"]) == steps == list(range(ckpt[i] + 1, STEPS + 1))
        assert [a["outcome"] for a in d["attempt_history"]] == ["pruned", "succeeded"], context

    worker.send(signal.SIGTERM)
    assert worker.wait(DEADLINE) == 0, fleet.explain()
    assert "finish refused" not in worker.log_path.read_text(), fleet.explain()  # no member finished twice
    fleet.assert_clean()
