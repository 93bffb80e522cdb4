"""Early stopping end to end: `gridfleet serve` on Postgres and three `gridfleet worker` processes racing
through a grid of known curves (the curve trainer) with an ASHA rule; then `gridfleet resume-job` brings a
pruned job back and it continues from its checkpoint (docs/early_stopping.md)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.processes import DEADLINE, gridfleet_cmd, job, ok
from tests.integration.test_pruning import asha_promotes
from worker.trainers import curve

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
                                reason="needs Linux /proc and POSIX process groups")

STEPS, MIN_STEPS, ETA = 18, 2, 3  # rungs at steps 2 and 6; 18 is the end (max_resource)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_asha_with_racing_workers_then_resume_by_hand(db_url, fleet):
    server = fleet.start_server(db_url)
    api = server.api
    xs = [0.3 + d for d in (0.8, 0.1, 0.5, 0.0, 0.7, 0.3, 1.0, 0.2, 0.6)]
    ok(api.post("/grids", json={
        "name": "asha-e2e", "trainer": "curve", "objective": "min:loss",
        "config": {"steps": STEPS, "step_seconds": 0.15, "checkpoint_every": 1},
        "axes": {"x": xs},
        "prune": {"rule": "asha", "min_steps": MIN_STEPS, "reduction_factor": ETA, "max_resource": STEPS}}))
    workers = [fleet.start_worker(server, f"w{i}") for i in range(3)]

    def all_ended():
        rows = ok(api.get("/grids/asha-e2e/results"))["results"]
        return rows if all(r["state"] in ("succeeded", "pruned", "failed") for r in rows) else None

    rows = fleet.wait_for(all_ended, "every job to end")
    context = f"\n{rows}\n{fleet.explain()}"
    by_id = {r["job_id"]: r for r in rows}
    assert {r["state"] for r in rows} <= {"succeeded", "pruned"}, context

    # The log of rung decisions replays under the published rule, in the order the scheduler made them.
    decisions = ok(api.get("/grids/asha-e2e/rungs"))["rungs"]
    seen: dict[int, list[float]] = {}
    for d in decisions:
        cfg = curve.Config.model_validate(by_id[d["job_id"]]["config"])
        rung_step = MIN_STEPS * ETA ** d["rung"]
        assert d["step"] == rung_step and d["value"] == pytest.approx(curve.loss_at(cfg, rung_step)), (d, context)
        assert d["promoted"] == asha_promotes(d["value"], seen.get(d["rung"], [])), (d, seen, context)
        seen.setdefault(d["rung"], []).append(d["value"])
    stopped = {d["job_id"]: d for d in decisions if not d["promoted"]}
    # Pruned: exactly the jobs the rule stopped, at the rung's step; every other job ran to the end.
    assert {j for j, r in by_id.items() if r["state"] == "pruned"} == set(stopped), context
    assert stopped, "the grid should prune some configs" + context
    for job_id, d in stopped.items():
        assert by_id[job_id]["pruned"]["step"] == d["step"] and by_id[job_id]["pruned"]["rung"] == d["rung"]
        assert by_id[job_id]["checkpoint"]["step"] >= d["step"]  # it kept its checkpoint (taken as it stopped)
    for r in rows:
        if r["state"] == "succeeded":
            assert r["result"]["steps"] == STEPS and r["result"]["resumed_from"] == 0, r
    best = min(rows, key=lambda r: r["config"]["x"] if r["config"]["x"] >= 0.3 else 99)
    assert best["config"]["x"] == 0.3 and best["state"] == "succeeded", context
    assert rows[0]["job_id"] == best["job_id"]  # ranked first in the results

    # Resume one pruned job by hand: it continues from its checkpoint and runs to the end, not pruned again.
    victim = next(iter(stopped))
    checkpointed = by_id[victim]["checkpoint"]["step"]
    env = fleet.env(GRIDFLEET_TOKEN=server.admin_token)
    out = subprocess.run([*gridfleet_cmd(), "resume-job", str(victim), "--server", server.url], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "queued" in out.stdout, out
    done = fleet.wait_for(lambda: (d := job(api, victim))["state"] not in ("queued", "running") and d,
                          "the resumed job to end")
    assert done["state"] == "succeeded" and done["result"]["resumed_from"] == checkpointed, (done, context)
    last = done["attempt_history"][-1]
    steps = sorted(m["step"] for m in ok(api.get(f"/jobs/{victim}/metrics"))["metrics"]
                   if m["attempt_id"] == last["id"])
    assert steps == list(range(checkpointed + 1, STEPS + 1)), steps
    assert done["prune_exempt"] and done["pruned_by"] is None
    # A second resume is refused: the job is no longer pruned.
    again = subprocess.run([*gridfleet_cmd(), "resume-job", str(victim), "--server", server.url], env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "409" in again.stderr, again

    for proc in workers:
        proc.send(signal.SIGTERM)
    for proc in workers:
        assert proc.wait(DEADLINE) == 0, fleet.explain()
    fleet.assert_clean()
