"""learning_rules' fused training (worker/trainers/learning_rules_fused.py): a gang's members equal their solo runs."""
from __future__ import annotations

import fused_harness  # tests/trainers/fused_harness.py
import harness  # tests/trainers/harness.py
import numpy as np
import pytest
import torch

from worker import trainers
from worker.trainers import learning_rules
from worker.trainers.learning_rules import Config

SEEDS = [3, 4, 5, 6]
# Three members of one shape: own seed (the job's), variance, and per rule a knob of its own.
MEMBERS = {
    "ga": [{"variance": 0.1}, {"variance": 0.5, "mutation": 0.02, "parents": 3}, {"variance": 1.0, "g": 1.5}],
    "bptt": [{"variance": 0.1}, {"variance": 0.5, "lr": 2e-3}, {"variance": 1.0, "trainable": ["J_rec", "J_out"]}],
}


def small(rule: str, **overrides) -> Config:
    """CDI N=2, 30-step trials, 20 units, small batches: one step in milliseconds."""
    config = {"rule": rule, "N": 2, "trial_length": 30, "batch_size": 32, "validation_trials": 100, "hidden_size": 20,
              "population": 8, "max_steps": 12, "log_every": 2, "checkpoint_every": 100, "ff_error_trigger": 5,
              **overrides}
    return Config.model_validate(config)


def configs(rule: str) -> list[Config]:
    return [small(rule, **m) for m in MEMBERS[rule]]


Gang = fused_harness.Gang.for_trainer("learning_rules")
Solo = fused_harness.Solo.for_trainer(learning_rules.train, returns=(learning_rules.Diverged,))
solo_runs = Solo.runs


def same_reports(solo: harness.Harness, fused: harness.Harness, after: int = 0) -> None:
    for a, b in fused_harness.paired_reports(solo, fused, after):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["val_accuracy"] == b["val_accuracy"] and a["stop_accuracy"] == b["stop_accuracy"]


def same_state(solo: harness.Harness, fused: harness.Harness) -> None:
    a, b = solo.store.load(solo.checkpoints[-1]), fused.store.load(fused.checkpoints[-1])
    assert a.keys() == b.keys()  # the solo format
    assert a["step"] == b["step"] and a["run"]["history"] == b["run"]["history"]
    for key in learning_rules.MATRICES:
        assert torch.allclose(a["params"][key], b["params"][key], rtol=1e-4, atol=1e-6), key
    if "population" in a:
        for key in learning_rules.MATRICES:
            assert torch.allclose(a["population"][key], b["population"][key], rtol=1e-4, atol=1e-6), key
    if "optimizer" in a:
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        for index, entry in a["optimizer"]["state"].items():
            assert torch.allclose(entry["exp_avg"], b["optimizer"]["state"][index]["exp_avg"], rtol=1e-4, atol=1e-7)
    assert torch.equal(a["generator"], b["generator"])  # the same trials, start states and mutations were drawn


def same_result(solo_result: dict, fused_result: dict) -> None:
    assert fused_result["fused"] is True
    for key in ("rule", "task", "variance", "steps", "converged", "val_accuracy", "stop_accuracy", "accuracy_curve"):
        assert solo_result[key] == fused_result[key], key
    a, b = np.load(solo_result["matrices"]), np.load(fused_result["matrices"])
    for key in learning_rules.MATRICES:
        assert np.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def same_run(solo: harness.Harness, fused: harness.Harness, solo_result: dict, result: dict) -> None:
    """The member's reports, checkpoint and result are its solo run's."""
    same_reports(solo, fused)
    same_state(solo, fused)
    same_result(solo_result, result)


@pytest.mark.parametrize("rule", ["ga", "bptt"])
def test_three_members_with_own_seed_and_variance_equal_their_solo_runs(tmp_path, rule):
    cfgs = configs(rule)
    assert len({learning_rules.fuse_key(c) for c in cfgs}) == 1
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    fused_harness.assert_members(same_run, solo_runs(tmp_path, cfgs, SEEDS), gang, results)
    # the members learned different things: the gang did not train one network for all
    finals = [np.load(r["matrices"])["J_rec"] for r in results]
    assert not np.allclose(finals[0], finals[1]) and not np.allclose(finals[1], finals[2])


def test_a_member_that_converges_leaves_and_the_others_go_on_to_their_cap(tmp_path):
    """An easy member (no noise, a short stop window) meets its stop rule early; the others run to max_steps."""
    cfgs = configs("ga")
    cfgs[0] = small("ga", variance=0.0, stop_window=2, stop_accuracy=0.5, max_steps=40)
    cfgs[2] = small("ga", variance=1.0, max_steps=40)
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    assert results[0]["converged"] and results[0]["steps"] < 40
    assert results[1]["steps"] == 12 and results[2]["steps"] == 40
    for (solo, solo_result), fused, result in zip(solo_runs(tmp_path, cfgs, SEEDS), gang.members, results):
        same_reports(solo, fused)
        same_result(solo_result, result)


@pytest.mark.parametrize("rule", ["ga", "bptt"])
def test_a_member_whose_loss_turns_nan_leaves_and_the_others_equal_their_solo_runs(tmp_path, rule):
    cfgs = configs(rule)
    # past Config's limits, to force a NaN: a gain (ga; the unmutated elite would keep a finite best) or Adam
    # steps (bptt) of 1e30 overflow float32
    blowup = {"g": 1e30} if rule == "ga" else {"lr": 1e30}
    if rule == "bptt":  # the seed's dynamics read out J_out h unsquashed; its shape is part of the fuse key
        cfgs = [c.model_copy(update={"dynamics": "seed"}) for c in cfgs]
    cfgs[1] = cfgs[1].model_copy(update=blowup)
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    assert isinstance(results[1], learning_rules.Diverged), results[1]
    solos = solo_runs(tmp_path, cfgs, SEEDS)
    assert isinstance(solos[1][1], learning_rules.Diverged) and solos[1][1].step == results[1].step  # as solo
    fused_harness.assert_members(same_run, solos, gang, results, rows=(0, 2))


def test_a_stopped_member_checkpoints_and_leaves_while_the_rest_go_on(tmp_path):
    cfgs = configs("bptt")
    gang = Gang(tmp_path / "gang", SEEDS[:3], stop_at=[None, 5, None])
    results = gang.train(cfgs)
    assert results[1] == {"stopped_at": 6}  # reports are every 2 steps: the first at or past 5 is 6
    assert [p["step"] for p in gang.members[1].checkpoints] == [6]
    solos = solo_runs(tmp_path, cfgs, SEEDS)
    fused_harness.assert_members(same_run, solos, gang, results, rows=(0, 2))


@pytest.mark.parametrize("rule", ["ga", "bptt"])
def test_a_stopped_gang_resumed_solo_and_fused_gives_the_uninterrupted_results(tmp_path, rule):
    cfgs = configs(rule) + [small(rule, variance=0.3)]
    runs, again = fused_harness.resumed_apart(Gang, Solo, tmp_path, cfgs, SEEDS, stop_at=6)
    assert [h.reports[0][0] for h in again.members] == [8, 8, 2]
    for i, (solo, h, solo_result, result) in enumerate(runs):
        same_reports(solo, h, after=6 if i < 3 else 0)
        same_state(solo, h)
        for key in ("steps", "val_accuracy", "accuracy_curve"):
            assert solo_result[key] == result[key], (i, key)


def test_fuse_keys_split_on_shape_and_join_on_seed_variance_and_rule_knobs():
    for rule in ("ga", "bptt"):
        base = small(rule)
        key = learning_rules.fuse_key(base)
        for change in ({"hidden_size": 21}, {"trial_length": 31}, {"batch_size": 33}, {"validation_trials": 101},
                       {"dt": 0.2}, {"dynamics": "seed"}, {"N": 3}, {"rdm": True, "N": None}):
            assert learning_rules.fuse_key(small(rule, **change)) != key, (rule, change)
        for same in ({"variance": 1.0}, {"mean": 0.2}, {"g": 1.5}, {"init_scale": 0.1}, {"max_steps": 99},
                     {"stop_window": 3}, {"mutation": 0.1, "parents": 2}, {"lr": 1e-2, "trainable": ["J_in"]},
                     {"log_every": 7}):
            assert learning_rules.fuse_key(small(rule, **same)) == key, (rule, same)
    assert learning_rules.fuse_key(small("ga", population=9)) != learning_rules.fuse_key(small("ga"))
    assert learning_rules.fuse_key(small("ga")) != learning_rules.fuse_key(small("bptt"))
    assert learning_rules.fuse_key(small("ff")) is None  # full-FORCE is never fused
    # the registry's hook (stored as jobs.fuse_key at submit) is this one
    assert trainers.fuse_key("learning_rules", {"model_name": "ga_x", "-v": 0.5}) == learning_rules.fuse_key(
        Config(rule="ga", variance=0.5))
    assert trainers.fuse_key("learning_rules", {"model_name": "ff_x"}) is None


def test_train_many_refuses_configs_of_different_fuse_keys_and_ff(tmp_path):
    gang = Gang(tmp_path, [0, 1])
    with pytest.raises(ValueError, match="different fuse keys"):
        gang.train([small("ga"), small("bptt")])
    with pytest.raises(ValueError, match="not fused"):
        gang.train([small("ff"), small("ff")])
