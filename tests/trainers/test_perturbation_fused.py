"""perturbation's fused training (worker/trainers/perturbation_fused.py): a gang's members equal their solo runs."""
from __future__ import annotations

import fused_harness  # tests/trainers/fused_harness.py
import harness  # tests/trainers/harness.py
import pytest
import torch

from worker import trainers
from worker.trainers import perturbation
from worker.trainers.perturbation import Config

METHODS = ["wp", "spsa", "np", "bptt"]
SEEDS = [3, 4, 5, 6]
# Three members of one shape: own sigma, learning rate (one a schedule) and seed (training.seed None: the job's).
MEMBERS = [
    {"perturbation": 1e-4, "learning_rate": 1e-3},
    {"perturbation": 3e-4, "learning_rate": 5e-4, "clip": False},
    {"perturbation": 2e-4, "learning_rate": "step", "base_learning_rate": 2e-3, "decay_rate": 0.5, "decay_steps": 10,
     "warmup_epochs": 3, "max_clip_value": 0.05, "min_clip_value": -0.05},
]


def small(method: str, data: dict | None = None, **training) -> Config:
    settings = {"gradient_computation": method, "epochs": 30, "num_directions": 6, "log_every": 5,
                "checkpoint_every": 100, "seed": None, **training}
    return Config.model_validate({"model": {"hidden_size": 5}, "training": settings,
                                  "data": {"length": 20, "amplitude": 1.0, **(data or {})}})


def configs(method: str, data: list[dict] | None = None) -> list[Config]:
    return [small(method, None if data is None else data[i], **m) for i, m in enumerate(MEMBERS)]


Gang = fused_harness.Gang.for_trainer("perturbation")
Solo = fused_harness.Solo.for_trainer(perturbation.train, returns=(perturbation.Diverged,))
solo_runs = Solo.runs


def same_reports(solo: harness.Harness, fused: harness.Harness, after: int = 0) -> None:
    for a, b in fused_harness.paired_reports(solo, fused, after):
        for key in ("train_loss", "val_loss", "forwards", "learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def same_weights(solo: harness.Harness, fused: harness.Harness) -> None:
    a, b = solo.store.load(solo.checkpoints[-1]), fused.store.load(fused.checkpoints[-1])
    assert a["step"] == b["step"] and a["run"]["forwards"] == b["run"]["forwards"]
    assert a["params"].keys() == b["params"].keys()  # the solo format
    for key in a["params"]:
        assert a["params"][key].dtype == b["params"][key].dtype
        assert torch.allclose(a["params"][key], b["params"][key], rtol=1e-9, atol=1e-12), key
    assert torch.equal(a["generator"], b["generator"])  # the same directions and noise were drawn


def same_result(solo_result: dict, fused_result: dict) -> None:
    assert fused_result["fused"] is True
    for key in ("train_loss", "val_loss", "best_val_loss"):
        assert solo_result[key] == pytest.approx(fused_result[key], rel=1e-9), key
    for key in ("epochs", "forwards", "weights", "gradient_computation"):
        assert solo_result[key] == fused_result[key], key
    assert torch.load(fused_result["weights_file"]).keys() == torch.load(solo_result["weights_file"]).keys()


def same_run(solo: harness.Harness, fused: harness.Harness, solo_result: dict, result: dict, after: int = 0):
    """The member's reports (past `after`), weights and result are its solo run's."""
    same_reports(solo, fused, after)
    same_weights(solo, fused)
    same_result(solo_result, result)


@pytest.mark.parametrize("method", METHODS)
def test_three_members_with_own_sigma_lr_and_seed_equal_their_solo_runs(tmp_path, method):
    cfgs = configs(method)
    assert len({perturbation.fuse_key(c) for c in cfgs}) == 1
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    fused_harness.assert_members(same_run, solo_runs(tmp_path, cfgs, SEEDS), gang, results)
    # the members learned different things: the gang did not train one net for all
    assert len({round(r["train_loss"], 12) for r in results}) == 3


@pytest.mark.parametrize("method", ["wp", "np"])
def test_members_with_their_own_waves_read_their_own_rows(tmp_path, method):
    """Different amplitudes, a noisy and a random-phase wave: each row of the stack reads its member's data."""
    waves = [{"amplitude": 1.0, "n_samples": 5}, {"amplitude": 2.0, "n_samples": 5, "noise": 0.1},
             {"phase": "random", "n_samples": 5}]
    cfgs = configs(method, waves)
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    solos = solo_runs(tmp_path, cfgs, SEEDS)
    fused_harness.assert_members(same_run, solos, gang, results)
    for (_, solo_result), result in zip(solos, results):
        assert "test_loss" in result and result["test_loss"] == pytest.approx(solo_result["test_loss"], rel=1e-9)


def test_a_member_whose_loss_overflows_leaves_and_the_others_equal_their_solo_runs(tmp_path):
    cfgs = configs("wp")
    huge = cfgs[1].training.model_copy(update={"learning_rate": 1e300})  # past Config's limit: weights overflow
    cfgs[1] = cfgs[1].model_copy(update={"training": huge})
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    assert isinstance(results[1], perturbation.Diverged), results[1]
    solos = solo_runs(tmp_path, cfgs, SEEDS)
    assert isinstance(solos[1][1], perturbation.Diverged) and solos[1][1].epoch == results[1].epoch < 30  # as solo
    same_reports(solos[1][0], gang.members[1])
    fused_harness.assert_members(same_run, solos, gang, results, rows=(0, 2))


def test_a_stopped_member_checkpoints_and_leaves_while_the_rest_go_on(tmp_path):
    cfgs = configs("spsa")
    gang = Gang(tmp_path / "gang", SEEDS[:3], stop_at=[None, 15, None])
    results = gang.train(cfgs)
    assert results[1] == {"stopped_at": 15}
    assert [p["step"] for p in gang.members[1].checkpoints] == [15]
    assert gang.members[1].reports[-1][0] == 15
    solos = solo_runs(tmp_path, cfgs, SEEDS)
    fused_harness.assert_members(same_run, solos, gang, results, rows=(0, 2))


def test_a_stopped_gang_resumed_solo_and_fused_gives_the_uninterrupted_results(tmp_path):
    cfgs = configs("spsa") + [small("spsa", perturbation=5e-4, learning_rate=2e-3)]
    runs, again = fused_harness.resumed_apart(Gang, Solo, tmp_path, cfgs, SEEDS, stop_at=15)
    assert [h.reports[0][0] for h in again.members] == [20, 20, 5]
    for i, (solo, h, solo_result, result) in enumerate(runs):
        same_reports(solo, h, after=15 if i < 3 else 0)
        same_weights(solo, h)
        assert result["train_loss"] == pytest.approx(solo_result["train_loss"], rel=1e-9)
        assert [s for s, *_ in result["loss_curve"]] == [s for s, *_ in solo_result["loss_curve"]]


def test_a_solo_checkpoint_joins_a_gang_and_finishes_as_the_uninterrupted_run(tmp_path):
    cfgs = configs("bptt")[:2]
    pointers = Solo.stopped(tmp_path, cfgs, SEEDS, stop_at=10)
    gang = Gang(tmp_path, SEEDS[:2], checkpoints=pointers)
    fused_harness.assert_members(same_run, solo_runs(tmp_path, cfgs, SEEDS), gang, gang.train(cfgs), after=10)


def test_fuse_keys_split_on_shape_and_method_and_join_on_sigma_lr_seed_and_wave():
    base = small("spsa")
    key = perturbation.fuse_key(base)
    for change in ({"model": {"hidden_size": 6}}, {"training": {"gradient_computation": "wp"}},
                   {"training": {"num_directions": 7}}, {"training": {"dtype": "float32"}},
                   {"data": {"length": 21}}, {"data": {"n_samples": 3}}):
        section, values = next(iter(change.items()))
        changed = base.model_copy(update={section: getattr(base, section).model_copy(update=values)})
        assert perturbation.fuse_key(changed) != key, change
    for same in ({"training": {"perturbation": 0.1, "learning_rate": 0.5, "seed": 9, "epochs": 7, "clip": False}},
                 {"data": {"amplitude": 3.0, "phase": "random", "noise": 0.2}}, {"fsm": True}):
        section, values = next(iter(same.items()))
        update = {section: getattr(base, section).model_copy(update=values)} if isinstance(values, dict) else same
        assert perturbation.fuse_key(base.model_copy(update=update)) == key, same
    # wp's number of probes is the net's weights: num_directions does not split it
    wp = small("wp")
    assert perturbation.fuse_key(wp) == perturbation.fuse_key(small("wp", num_directions=99))
    # the registry's hook (stored as jobs.fuse_key at submit) is this one
    assert trainers.fuse_key("perturbation", {"training": {"gradient_computation": "np"}}) == perturbation.fuse_key(
        Config.model_validate({"training": {"gradient_computation": "np"}}))


def test_train_many_refuses_configs_of_different_fuse_keys(tmp_path):
    gang = Gang(tmp_path, [0, 1])
    with pytest.raises(ValueError, match="different fuse keys"):
        gang.train([small("wp"), small("spsa")])
