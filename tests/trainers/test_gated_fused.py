"""gated_rnn's fused training (worker/trainers/gated_fused.py): a gang's members equal their solo runs."""
from __future__ import annotations

import itertools

import fused_harness  # tests/trainers/fused_harness.py
import harness  # tests/trainers/harness.py
import pytest
import torch

from worker import trainers
from worker.trainers import gated_rnn
from worker.trainers.gated_rnn import Config

FLAGS = ["use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate",
         "use_new_state", "use_old_state", "use_residual"]
TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. to be or not to be. "

# Four members with different gates (every gate on in one, off in another, both readout kinds) and lrs.
MEMBERS = [
    {"lr": 3e-3},  # the defaults: forget + state gates, new state, residual
    {**dict.fromkeys(FLAGS, True), "lr": 1e-3},
    {**dict.fromkeys(FLAGS, False), "use_old_state": True, "use_residual": True, "lr": 5e-3},
    {**dict.fromkeys(FLAGS, False), "use_input_gate": True, "use_output_gate": True, "use_new_state": True,
     "lr": 2e-3},
]


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 200)
    return str(path)


def small(corpus: str, **overrides) -> Config:
    # windows of 12 bytes = 11 steps: 40 steps cross windows, and a stop at 25 falls mid-window
    config = {"state_size": 16, "n_layers": 2, "batch_size": 6, "history": 12, "steps": 40, "lr": 3e-3,
              "corpus": corpus, "log_every": 5, "checkpoint_every": 40}
    return Config.model_validate({**config, **overrides})


Gang = fused_harness.Gang.for_trainer("gated_rnn")
Solo = fused_harness.Solo.for_trainer(gated_rnn.train, returns=(gated_rnn.Diverged,))
solo_runs = Solo.runs


def assert_same_run(solo: harness.Harness, fused: harness.Harness, solo_result: dict, fused_result: dict):
    assert [s for s, _ in solo.reports] == [s for s, _ in fused.reports]
    for (_, a), (_, b) in zip(solo.reports, fused.reports):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["raw_loss"] == pytest.approx(b["raw_loss"], rel=1e-5, abs=1e-6)
    for key in ("min_loss", "final_loss"):
        assert solo_result[key] == pytest.approx(fused_result[key], rel=1e-5), key
    for key in ("steps", "steps_asked", "parameters", "batch_size", "history_size", "dataset"):
        assert solo_result[key] == fused_result[key], key
    a, b = solo.store.load(solo.checkpoints[-1]), fused.store.load(fused.checkpoints[-1])
    assert (a["step"], a["window_pos"]) == (b["step"], b["window_pos"])
    assert a["model"].keys() == b["model"].keys()  # the solo format: only this member's gates
    for name in a["model"]:
        assert a["model"][name].shape == b["model"][name].shape, name
        assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5), name
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, entry in a["optimizer"]["state"].items():
        assert torch.allclose(entry["exp_avg"], b["optimizer"]["state"][index]["exp_avg"], rtol=1e-4, atol=1e-6)
        assert float(entry["step"]) == float(b["optimizer"]["state"][index]["step"])
    assert torch.equal(a["starts"], b["starts"])
    assert torch.equal(a["sampler"], b["sampler"]) and torch.equal(a["torch_rng"], b["torch_rng"])


SEEDS = [3, 4, 5, 6]


def test_four_members_with_different_gates_and_lrs_equal_their_solo_runs(tmp_path, corpus):
    cfgs = [small(corpus, **m) for m in MEMBERS]
    gang = Gang(tmp_path / "gang", SEEDS)
    results = gang.train(cfgs)
    assert all(r["fused"] for r in results)
    for (solo, solo_result), fused, result in zip(solo_runs(tmp_path, cfgs, SEEDS), gang.members, results):
        assert_same_run(solo, fused, solo_result, result)
    # the members learned different things: the gang did not give everyone one model
    finals = [r["final_loss"] for r in results]
    assert len(set(finals)) == 4


def test_a_diverged_member_leaves_and_the_others_results_are_unchanged(tmp_path, corpus):
    cfgs = [small(corpus, **m) for m in MEMBERS[:3]]
    cfgs[1] = cfgs[1].model_copy(update={"lr": 1e30})  # past Config's limit, to force a NaN
    gang = Gang(tmp_path / "gang", SEEDS[:3])
    results = gang.train(cfgs)
    assert isinstance(results[1], gated_rnn.Diverged), results[1]
    diverged_at = results[1].step
    assert diverged_at < 40 and gang.members[1].reports[-1][0] == diverged_at
    solos = solo_runs(tmp_path, cfgs, SEEDS[:3])
    assert isinstance(solos[1][1], gated_rnn.Diverged) and solos[1][1].step == diverged_at  # as solo
    for i in (0, 2):
        assert_same_run(solos[i][0], gang.members[i], solos[i][1], results[i])


def test_a_cancelled_member_checkpoints_and_leaves_while_the_rest_go_on(tmp_path, corpus):
    cfgs = [small(corpus, **m) for m in MEMBERS[:3]]
    gang = Gang(tmp_path / "gang", SEEDS[:3], stop_at=[None, 15, None])
    results = gang.train(cfgs)
    assert results[1] == {"stopped_at": 15}
    assert [p["step"] for p in gang.members[1].checkpoints] == [15]
    assert gang.members[1].reports[-1][0] == 15
    solos = solo_runs(tmp_path, cfgs, SEEDS[:3])
    for i in (0, 2):
        assert_same_run(solos[i][0], gang.members[i], solos[i][1], results[i])


def test_a_stopped_gang_resumed_solo_and_fused_gives_the_uninterrupted_results(tmp_path, corpus):
    cfgs = [small(corpus, **m) for m in MEMBERS]
    runs, again = fused_harness.resumed_apart(Gang, Solo, tmp_path, cfgs, SEEDS, stop_at=25)
    assert [h.reports[0][0] for _, h, _, _ in runs] == [30, 30, 30, 5]
    for i, (solo, h, solo_result, result) in enumerate(runs):
        for key in ("min_loss", "final_loss"):
            assert solo_result[key] == pytest.approx(result[key], rel=1e-5), (i, key)
        assert [s for s, _ in result["loss_curve"]] == [s for s, _ in solo_result["loss_curve"]]
        expected = [r for r in solo.reports if r[0] > 25] if i < 3 else solo.reports
        assert [s for s, _ in h.reports] == [s for s, _ in expected]
        a, b = solo.store.load(solo.checkpoints[-1]), h.store.load(h.checkpoints[-1])
        assert a["step"] == b["step"] == 40
        for name in a["model"]:
            assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5), (i, name)


def seed_grid() -> list[Config]:
    """The seed's 432 configs: 96 flag combos x 1-3 layers x 32/256 units, 32 units only with residual."""
    configs = []
    for values in itertools.product([False, True], repeat=7):
        flags = dict(zip(FLAGS, values))
        if not (flags["use_new_state"] or flags["use_old_state"]):
            continue
        for n_layers, size in itertools.product([1, 2, 3], [32, 256]):
            if size == 32 and not flags["use_residual"]:
                continue
            configs.append(Config(**flags, n_layers=n_layers, state_size=size, steps_mode="finish_window"))
    return configs


def test_the_seeds_grid_fuses_into_six_shape_groups():
    grid = seed_grid()
    assert len(grid) == 432
    keys = {gated_rnn.fuse_key(c) for c in grid}
    assert len(keys) == 6
    # the registry's hook (stored as jobs.fuse_key at submit) is this one, from the config as submitted
    assert trainers.fuse_key("gated_rnn", {"state_size": 32, "n_layers": 3, "lr": 0.01}) == gated_rnn.fuse_key(
        Config(state_size=32, n_layers=3))
    base = Config()
    for change in ({"batch_size": 8}, {"history": 50}, {"steps": 5}, {"corpus": "x.txt"}, {"n_layers": 3}):
        assert gated_rnn.fuse_key(base.model_copy(update=change)) != gated_rnn.fuse_key(base), change
    for same in ({"lr": 0.1}, {"use_input_gate": True}, {"log_every": 7}):
        assert gated_rnn.fuse_key(base.model_copy(update=same)) == gated_rnn.fuse_key(base), same


def test_the_registry_finds_fused_training_only_where_a_trainer_offers_it():
    assert trainers.load_fused("gated_rnn").train_many is not None
    assert trainers.load_fused("sleep") is None  # noop trains gangs (a test trainer); sleep does not
    with pytest.raises(trainers.UnknownTrainer):
        trainers.load_fused("no_such_trainer")


def test_train_many_refuses_configs_of_different_fuse_keys(tmp_path, corpus):
    gang = Gang(tmp_path, [0, 1])
    with pytest.raises(ValueError, match="different fuse keys"):
        gang.train([small(corpus), small(corpus, state_size=8)])


def test_solo_checkpoints_join_a_gang_and_finish_as_the_uninterrupted_runs(tmp_path, corpus):
    cfgs = [small(corpus, **m) for m in MEMBERS[1:3]]
    pointers = Solo.stopped(tmp_path, cfgs, SEEDS, stop_at=25)
    gang = Gang(tmp_path, SEEDS[:2], checkpoints=pointers)
    results = gang.train(cfgs)
    assert [h.reports[0][0] for h in gang.members] == [30, 30]
    for (solo, solo_result), fused, result in zip(solo_runs(tmp_path, cfgs, SEEDS[:2]), gang.members, results):
        for key in ("min_loss", "final_loss"):
            assert solo_result[key] == pytest.approx(result[key], rel=1e-5), key
        a, b = solo.store.load(solo.checkpoints[-1]), fused.store.load(fused.checkpoints[-1])
        for name in a["model"]:
            assert torch.allclose(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5), name


def test_a_member_whose_reporting_fails_leaves_with_its_error(tmp_path, corpus):
    cfgs = [small(corpus, **m) for m in MEMBERS[:2]]
    gang = Gang(tmp_path / "gang", SEEDS[:2])
    fused_harness.fail_reports(gang.members[0], from_step=20)
    results = gang.train(cfgs)
    assert isinstance(results[0], ConnectionError)
    assert gang.members[0].reports[-1][0] == 15
    (solo, solo_result), = solo_runs(tmp_path, cfgs[1:], SEEDS[1:2])
    assert_same_run(solo, gang.members[1], solo_result, results[1])


def test_a_gang_whose_members_read_fewer_slots_and_whose_losses_span_chunks_equals_its_solo_runs(
        tmp_path, corpus, monkeypatch):
    # old-state-only members: the gang's readout is one slot wide; one member per head chunk: 4 chunks
    from worker.trainers import gated_fused
    monkeypatch.setattr(gated_fused._HeadLoss, "CHUNK_BYTES", 6 * 256 * 4)
    members = [{**m, "use_new_state": False, "use_old_state": True, "use_residual": False} for m in MEMBERS]
    cfgs = [small(corpus, **m) for m in members]
    gang = Gang(tmp_path / "gang", SEEDS)
    results = gang.train(cfgs)
    for (solo, solo_result), fused, result in zip(solo_runs(tmp_path, cfgs, SEEDS), gang.members, results):
        assert_same_run(solo, fused, solo_result, result)
