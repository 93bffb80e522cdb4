"""sparse_rnn's fused training (worker/trainers/sparse_fused.py): a gang's members equal their solo runs.

Tiny block models on the offline RandomAnomaly task (6x6 images), shuffled, so every member has its own
blocks, data and batch order from its own seed; real TrainerContexts, Pipes and LocalStores."""
from __future__ import annotations

import fused_harness  # tests/trainers/fused_harness.py
import harness  # tests/trainers/harness.py
import pytest
import torch

from worker import trainers
from worker.trainers import gated_rnn, sparse_rnn
from worker.trainers.sparse_rnn import Config

LRS = [3e-3, 1e-2, 5e-3, 2e-3]
SEEDS = [3, 4, 5, 6]


def small(representation: str = "dense", **overrides) -> Config:
    # 32 sequences in batches of 8: 4 steps an epoch, 3 epochs; a stop at step 6 falls mid-epoch
    config = {"hidden_size": 16, "learning_rate": 3e-3, "max_epochs": 3, "log_every": 2, "density": 0.3,
              "checkpoint_every": 100, "representation": representation,
              "data": {"dataset": "random_anomaly", "image_size": 6, "train_size": 32, "validation_size": 8,
                       "test_size": 8, "batch_size": 8, "shuffle": True}}
    return Config.model_validate({**config, **overrides})


def members(representation: str, count: int = 4) -> list[Config]:
    return [small(representation, learning_rate=lr) for lr in LRS[:count]]


Gang = fused_harness.Gang.for_trainer("sparse_rnn")
Solo = fused_harness.Solo.for_trainer(sparse_rnn.train, returns=(gated_rnn.Diverged,))
solo_runs = Solo.runs


def assert_same_reports(expected: list, got: list) -> None:
    assert [(s, sorted(v)) for s, v in expected] == [(s, sorted(v)) for s, v in got]
    for (_, a), (_, b) in zip(expected, got):
        for key in a:  # a NaN is reported as None
            assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def assert_same_weights(a: dict, b: dict) -> None:
    assert (a["step"], a["epoch"], a["pos"], a["representation"]) == (b["step"], b["epoch"], b["pos"], b["representation"])
    assert a["order"] == b["order"] and torch.equal(a["shuffler"], b["shuffler"])
    assert a["model"].keys() == b["model"].keys()  # the solo format
    for name in a["model"]:
        assert a["model"][name].shape == b["model"][name].shape, name
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, entry in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        assert float(entry["step"]) == float(other["step"])
        assert torch.allclose(entry["exp_avg"], other["exp_avg"], rtol=1e-4, atol=1e-7)
        assert torch.allclose(entry["exp_avg_sq"], other["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def assert_same_run(solo: harness.Harness, fused: harness.Harness, solo_result: dict, fused_result: dict):
    assert_same_reports(solo.reports, fused.reports)
    for key in ("final_loss", "min_val_loss", "test_loss", "test_accuracy"):
        assert solo_result[key] == pytest.approx(fused_result[key], rel=1e-5), key
    for key in ("steps", "epochs", "parameters", "representation", "density", "dataset", "loss_kind"):
        assert solo_result[key] == fused_result[key], key
    assert [s for s, _ in solo_result["loss_curve"]] == [s for s, _ in fused_result["loss_curve"]]
    assert_same_weights(solo.store.load(solo.checkpoints[-1]), fused.store.load(fused.checkpoints[-1]))


@pytest.mark.parametrize("representation", ["dense", "sparse"])
def test_four_members_with_their_own_lrs_and_seeds_equal_their_solo_runs(tmp_path, representation):
    cfgs = members(representation)
    gang = Gang(tmp_path / "gang", SEEDS)
    results = gang.train(cfgs)
    assert all(r["fused"] for r in results), results
    for (solo, solo_result), fused, result in zip(solo_runs(tmp_path, cfgs, SEEDS), gang.members, results):
        assert_same_run(solo, fused, solo_result, result)
    # each member had its own blocks and data order: the gang did not train one model four times
    finals = [gang.members[i].store.load(gang.members[i].checkpoints[-1]) for i in range(4)]
    assert not torch.equal(finals[0]["model"]["W0"], finals[1]["model"]["W0"])
    assert len({r["final_loss"] for r in results}) == 4


def test_a_diverged_member_leaves_and_the_others_results_are_unchanged(tmp_path):
    cfgs = members("dense", 3)
    cfgs[1] = cfgs[1].model_copy(update={"learning_rate": 1e30})  # past Config's limit, to force a NaN
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    assert isinstance(results[1], gated_rnn.Diverged), results[1]
    solos = solo_runs(tmp_path, cfgs, SEEDS[:3])
    assert isinstance(solos[1][1], gated_rnn.Diverged) and solos[1][1].step == results[1].step  # as solo
    assert results[1].step < 12 and gang.members[1].reports[-1][0] == results[1].step
    assert_same_reports(solos[1][0].reports, gang.members[1].reports)
    for i in (0, 2):
        assert_same_run(solos[i][0], gang.members[i], solos[i][1], results[i])


def test_a_stopped_member_checkpoints_and_leaves_while_the_rest_go_on(tmp_path):
    cfgs = members("sparse", 3)
    gang = Gang(tmp_path / "gang", SEEDS[:3], stop_at=[None, 6, None])
    results = gang.train(cfgs)
    assert results[1] == {"stopped_at": 6}
    assert [p["step"] for p in gang.members[1].checkpoints] == [6]
    solos = solo_runs(tmp_path, cfgs, SEEDS[:3])
    for i in (0, 2):
        assert_same_run(solos[i][0], gang.members[i], solos[i][1], results[i])
    # what it reported before leaving is the solo run's beginning
    assert_same_reports([r for r in solos[1][0].reports if r[0] <= 6], gang.members[1].reports)


def test_stopped_members_resume_solo_or_in_a_new_gang_and_finish_as_uninterrupted_runs(tmp_path):
    cfgs = members("sparse")
    gang = Gang(tmp_path / "gang", SEEDS[:3], stop_at=[6] * 3)  # SIGTERM mid-epoch: should_stop for all
    assert gang.train(cfgs[:3]) == [{"stopped_at": 6}] * 3
    pointers = [h.checkpoints[-1] for h in gang.members]
    orders = [h.store.load(p)["order"] for h, p in zip(gang.members, pointers)]
    assert len({tuple(order) for order in orders}) == 3  # each member shuffles with its own generator
    # member 3 stopped in a solo run: its checkpoint joins the next gang
    first = Solo(tmp_path / "gang" / "m3", seed=SEEDS[3], job_id=13, stop_at=6)
    assert first.run(cfgs[3]) == {"stopped_at": 6}
    pointers.append(first.checkpoints[-1])
    # member 0 goes on solo; 1, 2 (gang checkpoints) and 3 (solo checkpoint) in a new gang, with a fresh
    # member beside them (a gang joins only members at the same step: it trains in its own group)
    alone = Solo(tmp_path / "gang" / "m0", seed=SEEDS[0], job_id=10, checkpoint=pointers[0])
    alone_result = alone.run(cfgs[0])
    again = Gang(tmp_path / "gang", SEEDS[1:] + [7], checkpoints=pointers[1:] + [None],
                 names=["m1", "m2", "m3", "fresh"])
    resumed = again.train(cfgs[1:] + [cfgs[0]])
    assert [h.reports[0][0] for h in [alone, *again.members]] == [8, 8, 8, 8, 2]
    straight = solo_runs(tmp_path, cfgs + [cfgs[0]], SEEDS + [7])
    for i, (h, result) in enumerate([(alone, alone_result), *zip(again.members, resumed)]):
        solo, solo_result = straight[i]
        for key in ("final_loss", "min_val_loss", "test_loss"):
            assert solo_result[key] == pytest.approx(result[key], rel=1e-5), (i, key)
        expected = solo.reports if i == 4 else [r for r in solo.reports if r[0] > 6]
        assert_same_reports(expected, h.reports)
        assert_same_weights(solo.store.load(solo.checkpoints[-1]), h.store.load(h.checkpoints[-1]))


def test_fuse_key_groups_by_layout_and_run_and_lets_lr_and_intervals_differ():
    base = small()
    assert sparse_rnn.fuse_key(base) == sparse_rnn.fuse_key(base.model_copy(update={"learning_rate": 0.1}))
    for same in ({"log_every": 7}, {"checkpoint_every": 3}, {"name": "x"}):
        assert sparse_rnn.fuse_key(small(**same)) == sparse_rnn.fuse_key(base), same
    for change in ({"hidden_size": 8}, {"density": 0.2}, {"max_epochs": 4}, {"representation": "sparse"},
                   {"data": {"dataset": "random_anomaly", "image_size": 6, "train_size": 32, "batch_size": 4}}):
        assert sparse_rnn.fuse_key(small(**change)) != sparse_rnn.fuse_key(base), change
    assert sparse_rnn.fuse_key(small(model_type="lstm")) is None
    many_blocks = small(row_sizes=[36] + [100 + i for i in range(40)] + [10], hidden_size=None)
    assert len(sparse_rnn.fuse_key(many_blocks)) <= 200  # what jobs.fuse_key holds
    assert sparse_rnn.fuse_key(small(model_type="mlp")) is not None  # a block model too
    assert trainers.fuse_key("sparse_rnn", {"hidden_size": 16, "lr": 0.5}) == trainers.fuse_key(
        "sparse_rnn", {"hidden_size": 16})
    assert trainers.load_fused("sparse_rnn").train_many is not None


def test_train_many_refuses_configs_of_different_fuse_keys_or_unfused_models(tmp_path):
    gang = Gang(tmp_path, [0, 1])
    with pytest.raises(ValueError, match="different fuse keys"):
        gang.train([small(), small(hidden_size=8)])
    with pytest.raises(ValueError, match="not fused"):
        Gang(tmp_path / "b", [0]).train([small(model_type="gru")])


@pytest.mark.parametrize("overrides", [{"model_type": "mlp", "sizes": [36, 12, 10]},  # seed 000's MLP as blocks
                                       {"bias": [False, True, False]}])  # a bias on some block rows only
def test_the_mlp_block_model_and_per_row_biases_fuse_as_solo(tmp_path, overrides):
    cfgs = [small(**overrides, learning_rate=lr, max_epochs=2) for lr in LRS[:2]]
    gang = Gang(tmp_path / "gang", SEEDS[:2])
    results = gang.train(cfgs)
    for (solo, solo_result), fused, result in zip(solo_runs(tmp_path, cfgs, SEEDS[:2]), gang.members, results):
        assert_same_run(solo, fused, solo_result, result)


def test_a_member_whose_checkpoint_cannot_be_read_fails_alone(tmp_path):
    assert_same_run(*fused_harness.unreadable_first(Gang, Solo, tmp_path, members("dense", 2), SEEDS, step=6))
