"""gated_rnn (seed 001) on tiny CPU runs, with a real TrainerContext, Pipe, Event and LocalStore."""
from __future__ import annotations

import itertools

import harness  # tests/trainers/harness.py
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from worker import trainers
from worker.trainers import gated_rnn
from worker.trainers.gated_rnn import Config, GatedRNN

FLAGS = ["use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate",
         "use_new_state", "use_old_state", "use_residual"]

TEXT = (
    "the quick brown fox jumps over the lazy dog. "
    "a stitch in time saves nine. "
    "to be or not to be, that is the question. "
)


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 200)  # ~23 KB of very repetitive text
    return str(path)


class Harness(harness.Harness):
    def train(self, **config) -> dict:
        return super().train(gated_rnn, config)


def small(corpus: str, **overrides) -> dict:
    config = {"state_size": 32, "n_layers": 1, "batch_size": 16, "history": 50, "steps": 300, "lr": 3e-3,
              "corpus": corpus, "log_every": 10, "checkpoint_every": 10_000}
    config.update(overrides)
    return config


# ---- (a) it learns ---------------------------------------------------------------------------------
def test_loss_goes_down_on_a_tiny_repetitive_corpus(tmp_path, corpus):
    h = Harness(tmp_path)
    result = h.train(**small(corpus))
    losses = [values["loss"] for _step, values in h.reports]
    assert [step for step, _ in h.reports] == list(range(10, 301, 10))
    # The moving average starts at 3.0 and first climbs towards ln(256) = 5.5 before it falls.
    assert losses[-1] < losses[0] - 1.0, losses
    assert losses[-1] < 2.5, losses  # far below the 5.5 nats/byte of guessing
    assert result["min_loss"] == min(losses)
    assert result["final_loss"] == losses[-1]
    assert result["steps"] == 300
    assert result["loss_curve"] == [[s, v["loss"]] for s, v in h.reports]


# ---- (b) checkpoint / resume is exact ----------------------------------------------------------------
def _final_state(h: Harness) -> dict:
    return h.store.load(h.checkpoints[-1])


def test_stop_and_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path, corpus):
    # windows of 20 bytes = 19 steps each: the stop at step 25 falls mid-window, with live hidden state
    config = small(corpus, steps=60, history=20, log_every=5, checkpoint_every=60,
                   use_input_gate=True, use_output_gate=True, use_old_state=True, n_layers=2)
    straight = Harness(tmp_path / "a", seed=3)
    full = straight.train(**config)

    first = Harness(tmp_path / "b", seed=3, stop_at=25)
    assert first.train(**config) == {"stopped_at": 25}
    assert [p["step"] for p in first.checkpoints] == [25]
    second = Harness(tmp_path / "b", seed=3, checkpoint=first.checkpoints[-1])
    resumed = second.train(**config)
    assert second.reports[0][0] == 30  # it went on from step 25, not from 0

    a, b = _final_state(straight), _final_state(second)
    assert a["step"] == b["step"] == 60
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for x, y in zip(a["hidden"], b["hidden"]):
        assert torch.equal(x, y)
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    assert [r for r in straight.reports if r[0] <= 25] == first.reports
    assert [r for r in straight.reports if r[0] > 25] == second.reports
    for key in ("min_loss", "final_loss", "steps", "loss_curve", "parameters"):
        assert full[key] == resumed[key], key


# ---- (c) the config ---------------------------------------------------------------------------------
def test_config_accepts_the_seeds_key_names():
    seed_names = Config.model_validate({"batch_size": 256, "history_size": 1000, "training_steps": 10_000,
                                        "lr": 1e-3, "log_frequency": 50})
    assert (seed_names.batch_size, seed_names.history, seed_names.steps, seed_names.lr, seed_names.log_every) == (
        256, 1000, 10_000, 1e-3, 50)
    other = Config.model_validate({"batch": 8, "window": 64, "n_steps": 7, "learning_rate": 0.01})
    assert (other.batch_size, other.history, other.steps, other.lr) == (8, 64, 7, 0.01)
    assert Config.model_validate({"history_len": 9}).history == 9
    defaults = Config()
    assert (defaults.batch_size, defaults.history, defaults.steps, defaults.lr, defaults.log_every) == (
        256, 1000, 10_000, 1e-3, 50)


def test_config_rejects_neither_new_nor_old_state():
    with pytest.raises(ValidationError, match="use_new_state and use_old_state are both false"):
        Config.model_validate({"use_new_state": False, "use_old_state": False})
    with pytest.raises(trainers.InvalidConfig, match="use_new_state"):
        trainers.validate_config("gated_rnn", {"use_new_state": False, "use_old_state": False})
    Config.model_validate({"use_new_state": False, "use_old_state": True})
    Config.model_validate({"use_new_state": True, "use_old_state": False})


@pytest.mark.parametrize("config, field", [({"state_size": 0}, "state_size"), ({"n_layers": 0}, "n_layers"),
                                           ({"lr": 0}, "lr"), ({"history": 1}, "history"),
                                           ({"use_gru": True}, "use_gru")])
def test_config_rejects_bad_values_naming_the_field(config, field):
    with pytest.raises(ValidationError) as info:
        Config.model_validate(config)
    assert field in [err["loc"][0] for err in info.value.errors()]


# ---- (d) every kind of layer runs -----------------------------------------------------------------------
SAMPLES = {
    "all": dict.fromkeys(FLAGS, True),
    "plain-new": {**dict.fromkeys(FLAGS, False), "use_new_state": True},
    "old-residual": {**dict.fromkeys(FLAGS, False), "use_old_state": True, "use_residual": True},
    "seed-best": {**dict.fromkeys(FLAGS, False), "use_forget_gate": True, "use_state_gate": True,
                  "use_new_state": True, "use_residual": True},
    "io-gates-both-states": {**dict.fromkeys(FLAGS, False), "use_input_gate": True, "use_output_gate": True,
                             "use_new_state": True, "use_old_state": True},
    "forget-only": {**dict.fromkeys(FLAGS, False), "use_forget_gate": True, "use_new_state": True},
}


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_flag_combos_run_three_steps(tmp_path, corpus, sample, n_layers):
    h = Harness(tmp_path)
    result = h.train(**small(corpus, **SAMPLES[sample], n_layers=n_layers, state_size=16, batch_size=4,
                             history=10, steps=3, log_every=1))
    assert result["steps"] == 3
    assert [s for s, _ in h.reports] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(v["raw_loss"])) for _, v in h.reports)


# Parameters that only shape the next state get no gradient when the output reads only the old state:
# the state is detached after every step (no BPTT), as in the seed's RNNLayer.
NEXT_STATE_ONLY = ("candidate", "state_gate", "forget_gate")


@pytest.mark.parametrize("n_layers", [1, 2])
def test_every_gate_is_used(n_layers):
    """All 96 flag combos, two steps: with the new state in the output every parameter gets a gradient
    (no dead gate: the forget gate scales the state whether or not there is a state gate); with only the
    old state, the next-state parameters get none and the last layer's readout and the head do."""
    for values in itertools.product([True, False], repeat=7):
        flags = dict(zip(FLAGS, values))
        if not (flags["use_new_state"] or flags["use_old_state"]):
            continue
        torch.manual_seed(0)
        model = GatedRNN(Config(**flags, n_layers=n_layers, state_size=8))
        byte = torch.tensor([1, 2, 3])
        _, states = model(byte, [torch.zeros(3, 8) for _ in range(n_layers)])
        logits, _ = model(byte, [s.detach() for s in states])
        F.cross_entropy(logits, torch.tensor([4, 5, 6])).backward()
        grads = {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in model.named_parameters()}
        if flags["use_new_state"]:
            assert all(grads.values()), (flags, [name for name, ok in grads.items() if not ok])
        else:
            assert not any(ok for name, ok in grads.items() if any(part in name for part in NEXT_STATE_ONLY)), flags
            last = f"layers.{n_layers - 1}."
            assert grads["head.weight"] and grads[last + "readout.weight"], flags
            if n_layers == 1:  # the input reaches the output only through the residual or the input gate
                assert grads["embed.weight"] == (flags["use_residual"] or flags["use_input_gate"]), flags


def test_forget_gate_scales_the_next_state():
    """As in the seed: a closed forget gate zeroes the next state, with or without a state gate."""
    for state_gate in (True, False):
        model = GatedRNN(Config(n_layers=1, state_size=8, use_forget_gate=True, use_state_gate=state_gate))
        layer = model.layers[0]
        with torch.no_grad():
            layer.forget_gate.weight.zero_()
            layer.forget_gate.bias.fill_(-100.0)
        _, (state,) = model(torch.tensor([1, 2]), [torch.ones(2, 8)])
        assert torch.allclose(state, torch.zeros_like(state)), state_gate


# ---- (e) steps_mode, the result's seed fields, the seed's config id ----------------------------------
def test_the_seeds_run_length_is_the_end_of_the_window_past_the_asked_steps():
    seed = Config(steps=10_000, history=1000, steps_mode="finish_window")
    assert seed.end_step == 10_989  # 11 windows of 999 predictions
    assert seed.end_step // seed.log_every == 219  # the points in the seed's result files
    assert Config(steps=10_000, history=1000).end_step == 10_000
    assert Config(steps=999, history=1000, steps_mode="finish_window").end_step == 999  # a full window: no more


def test_finish_window_runs_to_the_end_of_the_window_and_logs_as_the_seed(tmp_path, corpus):
    h = Harness(tmp_path)
    # windows of 4 bytes = 3 steps: 10 asked end at 12; the curve has the points at 5 and 10 only
    result = h.train(**small(corpus, steps=10, history=4, log_every=5, steps_mode="finish_window"))
    assert result["steps"] == 12 and result["steps_asked"] == 10 and result["steps_mode"] == "finish_window"
    assert [s for s, _ in h.reports] == [5, 10, 12]  # the end is still reported, for progress
    assert [s for s, _ in result["loss_curve"]] == [5, 10]
    assert result["min_loss"] == min(v for _, v in result["loss_curve"])
    assert result["final_loss"] == h.reports[-1][1]["loss"]
    assert h.of("progress")[-1][:2] == (12, 12)


def test_finish_window_with_fewer_steps_than_log_every_still_has_a_curve(tmp_path, corpus):
    result = Harness(tmp_path).train(**small(corpus, steps=2, history=4, log_every=50, steps_mode="finish_window"))
    assert result["steps"] == 3 and [s for s, _ in result["loss_curve"]] == [3]


def test_stop_and_resume_is_exact_in_finish_window_mode(tmp_path, corpus):
    # 40 asked, windows of 19: the run ends at 57; it checkpoints there, and the stop at 45 falls past the
    # asked steps, inside the last window
    config = small(corpus, steps=40, history=20, log_every=5, checkpoint_every=57, steps_mode="finish_window")
    straight = Harness(tmp_path / "a", seed=5)
    full = straight.train(**config)
    assert full["steps"] == 57
    first = Harness(tmp_path / "b", seed=5, stop_at=45)
    assert first.train(**config) == {"stopped_at": 45}
    began = first.store.load(first.checkpoints[-1])["start_time"]
    second = Harness(tmp_path / "b", seed=5, checkpoint=first.checkpoints[-1])
    resumed = second.train(**config)
    assert second.reports[0][0] == 50
    for key in ("min_loss", "final_loss", "steps", "steps_asked", "loss_curve", "parameters"):
        assert full[key] == resumed[key], key
    a, b = _final_state(straight), _final_state(second)
    assert a["step"] == b["step"] == 57
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert [r for r in straight.reports if r[0] > 45] == second.reports
    assert resumed["start_time"] == began <= resumed["end_time"]  # the first attempt's start, as the seed's


def test_the_result_carries_what_the_seeds_did(tmp_path, corpus):
    result = Harness(tmp_path).train(**small(corpus, steps=6, history=4, batch_size=3, log_every=3))
    assert (result["batch_size"], result["history_size"], result["dataset"]) == (3, 4, "corpus")
    assert result["start_time"] <= result["end_time"]
    assert gated_rnn.dataset_name("../../datasets/enwik8.txt") == "enwik8"
    assert gated_rnn.dataset_name("stdlib") == "stdlib"


def test_external_id_is_the_seeds_config_id():
    # results_01_all/00fff5ea...json in ASFaust/SLMfun holds this config under this id
    config = Config(**{**dict.fromkeys(FLAGS, False), "use_new_state": True, "use_old_state": True}, n_layers=2,
                    state_size=256, steps=50, batch_size=4, lr=0.5)  # training keys are not part of it
    assert gated_rnn.external_id(config) == "00fff5ea2993a3d7c03ddf1e8356fe917578d7eedce95b5b04260f659b411b55"
    assert trainers.external_id("gated_rnn", {**config.model_dump(), "steps": 7}) == gated_rnn.external_id(config)
    assert trainers.external_id("gated_rnn", {"state_size": 32}) != gated_rnn.external_id(config)
    assert trainers.external_id("noop", {}) is None  # a trainer without one
