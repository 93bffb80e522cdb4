"""worker/trainers/gangs.py, the bookkeeping the fused trainers share, on its own: each rule with members
that are plain objects (the fused trainers' tests run the same rules on real gangs)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from worker.trainers import gangs


def test_check_wants_one_ctx_per_config_one_fuse_key_and_no_unfused_config():
    key = lambda cfg: cfg.get("key")  # noqa: E731
    gangs.check([{"key": "a"}, {"key": "a"}], [0, 1], key, "a model")
    with pytest.raises(ValueError, match="one ctx per config"):
        gangs.check([{"key": "a"}], [0, 1], key, "a model")
    with pytest.raises(ValueError, match="one ctx per config"):
        gangs.check([], [], key, "a model")
    with pytest.raises(ValueError, match=r"cannot share a model: \['a', 'b'\]"):
        gangs.check([{"key": "a"}, {"key": "b"}], [0, 1], key, "a model")
    with pytest.raises(ValueError, match="never fused"):
        gangs.check([{"key": "a"}, {}], [0, 1], key, "a model", unfused="never fused")


def test_a_member_whose_start_fails_gets_its_error_and_the_others_start():
    def start(cfg, ctx):
        if cfg == "bad":
            raise FileNotFoundError(ctx)
        return (cfg, ctx)

    outcome = {}
    assert gangs.start(["a", "bad", "c"], [10, 11, 12], start, outcome) == [(0, ("a", 10)), (2, ("c", 12))]
    assert list(outcome) == [1] and isinstance(outcome[1], FileNotFoundError)


def test_one_gang_per_start_step_in_step_order_and_outcomes_by_index():
    started = [(0, ("m0", 5)), (1, ("m1", 0)), (3, ("m3", 5)), (4, ("m4", 0))]
    seen = []

    def gang(members):
        seen.append([name for name, _ in members])
        return {row: f"{name} done" for row, (name, _) in enumerate(members)}

    outcome = [None] * 5
    gangs.by_start(started, lambda m: m[1], gang, outcome)
    assert seen == [["m1", "m4"], ["m0", "m3"]]  # step 0's gang first; members in their order
    assert outcome == ["m0 done", "m1 done", None, "m3 done", "m4 done"]


def member(every: int, stop: bool = False, fails: bool = False):
    def should_stop():
        if fails:
            raise ConnectionError("pipe to the agent closed")
        return stop
    return SimpleNamespace(cfg=SimpleNamespace(checkpoint_every=every), ctx=SimpleNamespace(should_stop=should_stop))


def test_a_step_end_checkpoints_when_due_or_stopping_and_a_stopped_member_leaves_unless_it_is_the_last_step():
    members = [member(2), member(3), member(3, stop=True), member(3, fails=True), member(1)]
    for last in (False, True):
        saved, leaving = [], {4: "diverged"}  # already leaving: left alone
        gangs.checkpoint_or_leave(members, leaving, 4, saved.append, lambda m: 4 % m.cfg.checkpoint_every == 0,
                                  last=last)
        assert saved == [0, 2]
        assert isinstance(leaving.pop(3), ConnectionError)
        assert leaving == ({4: "diverged"} if last else {2: {"stopped_at": 4}, 4: "diverged"})


def test_a_finished_member_is_marked_fused_or_fails_with_its_error():
    assert gangs.finished(lambda: {"loss": 1.0}) == {"loss": 1.0, "fused": True}

    def broken():
        raise OSError("disk full")

    assert isinstance(gangs.finished(broken), OSError)
