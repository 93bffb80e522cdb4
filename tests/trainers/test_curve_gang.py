"""The curve trainer's gangs (`curve.train_many`, in this process with real contexts): members step in
lockstep, each from its own checkpoint; a member asked to stop checkpoints and leaves at once while the
others go on; every member's reports, checkpoints and result equal its solo run's. The agent's side (a gang
member pruned by the grid's rule) is tests/e2e/test_gang_pruning.py."""
from __future__ import annotations

from tests.trainers.harness import Harness
from worker import trainers
from worker.trainers import curve

CONFIGS = [{"x": 0.8, "steps": 12, "report_every": 3, "checkpoint_every": 2},
           {"x": 0.1, "y": 0.4, "steps": 12, "report_every": 1, "checkpoint_every": 5},
           {"x": 0.3, "steps": 7, "report_every": 2, "checkpoint_every": 1}]


def _gang(tmp_path, name: str, checkpoints: list[dict | None], stop_at: list[int | None]):
    harnesses = [Harness(tmp_path / f"{name}-{i}", checkpoint=checkpoints[i], stop_at=stop_at[i], job_id=i)
                 for i in range(len(CONFIGS))]
    left: list[tuple[int, object, list[int]]] = []  # (member, outcome, every member's last reported step then)
    for i, h in enumerate(harnesses):
        h.ctx.leave = lambda outcome, i=i: left.append((i, outcome, [x.ctx._last_step for x in harnesses]))
    outcomes = curve.train_many([curve.Config.model_validate(c) for c in CONFIGS], [h.ctx for h in harnesses])
    for h in harnesses:
        h.close()
    return harnesses, outcomes, left


def _solo(tmp_path, name: str, i: int, checkpoint: dict | None = None, stop_at: int | None = None):
    solo = Harness(tmp_path / f"{name}-solo-{i}", checkpoint=checkpoint, stop_at=stop_at, job_id=i)
    return solo, solo.train(curve, CONFIGS[i])


def test_curve_trains_gangs_and_each_member_equals_its_solo_run(tmp_path):
    assert trainers.load_fused("curve") is curve
    assert trainers.fuse_key("curve", {"x": 1.0}) is None  # never fused unless asked: solo tests stay solo
    assert trainers.fuse_key("curve", {"x": 1.0, "fuse_group": "g"}) == "curve:g"

    gang, outcomes, left = _gang(tmp_path, "gang", [None] * 3, [None, 4, None])  # member 1 is told to stop
    assert outcomes[1] == {"stopped_at": 4}
    assert [i for i, _, _ in left] == [1, 2, 0]  # each left the moment it was done, the stopped one first
    assert left[0][1] == {"stopped_at": 4} and left[0][2] == [3, 4, 4]  # at once, in lockstep with the others
    for i, h in enumerate(gang):
        solo, result = _solo(tmp_path, "gang", i, stop_at=4 if i == 1 else None)
        assert outcomes[i] == result
        assert h.reports == solo.reports and [c["step"] for c in h.checkpoints] == [c["step"] for c in solo.checkpoints]
    assert outcomes[0]["resumed_from"] == 0 and outcomes[2]["steps"] == 7


def test_members_resume_from_their_own_checkpoints(tmp_path):
    first, _, _ = _gang(tmp_path, "first", [None] * 3, [5, 2, None])  # 0 stops at 6 (checkpoints every 2)
    pointers = [first[0].checkpoints[-1], first[1].checkpoints[-1], first[2].checkpoints[-1]]
    assert [p["step"] for p in pointers] == [6, 2, 7]  # 0 and 1 stopped where told; 2 ran to its end
    again, outcomes, _ = _gang(tmp_path, "first", pointers, [None] * 3)
    for i, h in enumerate(again):
        solo, result = _solo(tmp_path, "again", i, checkpoint=pointers[i])
        assert outcomes[i] == result and outcomes[i]["resumed_from"] == pointers[i]["step"]
        assert h.reports == solo.reports
    assert [s for s, _ in again[0].reports] == [9, 12] and [s for s, _ in again[1].reports] == list(range(3, 13))
    assert again[2].reports == []  # already at its end: its result, no step


def test_a_member_whose_checkpoint_is_gone_fails_alone(tmp_path):
    gone = {"uri": f"local:{tmp_path / 'nowhere' / 'ckpt-000000000004.pt'}", "step": 4}
    gang, outcomes, left = _gang(tmp_path, "gone", [None, gone, None], [None] * 3)
    assert isinstance(outcomes[1], FileNotFoundError) and left[0][0] == 1  # it left first, before any step
    assert outcomes[0]["steps"] == 12 and outcomes[2]["steps"] == 7 and gang[1].reports == []
