"""`rule: hyperband` through the real queue on SQLite and Postgres (scheduler/pruning.py): Optuna's
HyperbandPruner asked through the same rung study as ASHA. Each job is in one bracket, chosen from its job
id; bracket b's rungs are at min_resource * eta^(b + k) below max_resource; each bracket decides among its
own jobs by the published ASHA rule; a claimed job carries its own bracket's rung steps (where its worker
waits for verdicts); and a second Queue (another API process: a study of its own) goes on deciding alike."""
from __future__ import annotations

import binascii
import math

import pytest
from pydantic import ValidationError

from scheduler.queue import Queue
from scheduler.spec import PruneSpec
from tests.integration.test_pruning import asha_promotes, beat, rungs, submit
from worker.trainers import curve

MIN, ETA, MAX = 2, 3, 54  # brackets 0..3 (floor(log3(54 / 2)) + 1 = 4); bracket 3's first rung is 54: none
RULE = {"rule": "hyperband", "min_steps": MIN, "reduction_factor": ETA, "max_resource": MAX}


def published_bracket(job_id: int) -> int:
    """Optuna's Hyperband allocation (brackets sized ceil(n * eta^s / (s + 1)), s = n - 1 - b), indexed by
    crc32 of "job_<id>" instead of the trial number (docs/early_stopping.md). Written apart from the code."""
    n = math.floor(math.log(MAX / MIN, ETA)) + 1
    budgets = [math.ceil(n * ETA ** (n - 1 - b) / (n - b)) for b in range(n)]
    left = binascii.crc32(f"job_{job_id}".encode()) % sum(budgets)
    for b, budget in enumerate(budgets):
        left -= budget
        if left < 0:
            return b
    raise AssertionError


def test_hyperband_brackets_decide_among_their_own_jobs_at_their_own_rungs(queue):
    xs = [round(0.3 + 0.07 * ((i * 7) % 27), 6) for i in range(27)]
    ids = submit(queue, "hb", xs, RULE, steps=MAX)
    worker = queue.register_worker("w", "h", ["curve"])
    jobs = {}
    for _ in ids:
        job = queue.claim(worker, trainers=["curve"])
        jobs[job.id] = job
    bracket = {job_id: published_bracket(job_id) for job_id in jobs}
    assert len(set(bracket.values())) >= 3, bracket  # the grid spreads over brackets
    for job_id, job in jobs.items():  # where its worker will wait: its own bracket's rungs below max_resource
        b = bracket[job_id]
        assert job.prune_steps == [MIN * ETA ** (b + k) for k in range(4) if MIN * ETA ** (b + k) < MAX], job

    pruned: dict[int, str] = {}
    reached = {job_id: 0 for job_id in jobs}
    via = queue
    for round_step in (2, 6, 18, MAX):  # every running job reports up to the next step, in claim order
        for job_id, job in jobs.items():
            if job_id not in pruned:
                reply = beat(via, job, range(reached[job_id] + 1, round_step + 1))
                reached[job_id] = round_step
                if reply.prune:
                    pruned[job_id] = reply.reason
        via = Queue(queue.engine, queue.policy)  # the next round through another process's study

    decisions = rungs(queue.engine)
    seen: dict[tuple[int, int], list[float]] = {}
    for row in decisions:  # every decision: its bracket's rung step, and the rule among that bracket's values
        b = bracket[row.job_id]
        cfg = curve.Config.model_validate(jobs[row.job_id].config)
        assert row.step == MIN * ETA ** (b + row.rung) < MAX, row
        assert row.value == pytest.approx(curve.loss_at(cfg, row.step)), row
        assert row.promoted == asha_promotes(row.value, seen.get((b, row.rung), [])), (row, seen)
        seen.setdefault((b, row.rung), []).append(row.value)
    assert {r.job_id for r in decisions if not r.promoted} == set(pruned)
    assert len({bracket[j] for j in pruned}) >= 2, (pruned, bracket)  # more than one bracket pruned
    for job_id, reason in pruned.items():
        assert reason.startswith("hyperband: loss") and f"of bracket {bracket[job_id]} " in reason, reason
    for job_id in jobs:  # a job decides first at its own bracket's first rung, never earlier
        first = [r.step for r in decisions if r.job_id == job_id][:1]
        assert first in ([], [MIN * ETA ** bracket[job_id]]), (job_id, first)
    assert not any(r.job_id for r in decisions if bracket[r.job_id] == 3)  # its first rung is max_resource
    best = min(jobs, key=lambda j: curve.final(curve.Config.model_validate(jobs[j].config)))
    assert best not in pruned


@pytest.mark.parametrize("fields, words", [
    ({"max_resource": None}, "max_resource: the hyperband rule needs it"),
    ({"min_early_stopping_rate": 1}, "min_early_stopping_rate: the hyperband rule sets it"),
])
def test_bad_hyperband_specs_name_the_field(fields, words):
    with pytest.raises(ValidationError, match=words):
        PruneSpec.model_validate({**RULE, "metric": "loss", **fields})
