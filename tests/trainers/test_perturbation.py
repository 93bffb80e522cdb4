"""perturbation (seed 003) on tiny CPU runs: gradients against autograd, the stacked forward against a loop,
learning, the FSM rollout, exact resume, and the seed's config.yml through the CLI and the API."""
from __future__ import annotations

import harness  # tests/trainers/harness.py
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from cli.main import load_grid_file
from common.settings import Settings
from scheduler.spec import GridSpec, expand
from worker import trainers
from worker.trainers import perturbation, population
from worker.trainers.perturbation import Config

# Seed 003's src/config.yml, as its repository holds it (the 1-20-1 sine run of its log).
SEED_CONFIG_YML = """\
model:
  name: 'rnn_1hl'
  input_size: 1
  hidden_size: 20
  output_size: 1
training:
  gradient_computation: 'wp'  # 'wp' or 'bptt'
  epochs: 2000
  learning_rate: 0.0001
  seed: 12
  perturbation: 0.001
  clip: True
  max_clip_value: 3
  min_clip_value: -3
log:
  log_file: 'src\\log.txt'
  experiment_name: 'rnn_1hl on sine data'"""


class Harness(harness.Harness):
    def train(self, **config) -> dict:
        return super().train(perturbation, config)

    def final_state(self) -> dict:
        return self.store.load(self.checkpoints[-1])


def tiny(method: str = "wp", **training) -> dict:
    settings = {"gradient_computation": method, "epochs": 40, "learning_rate": 1e-3, "perturbation": 1e-4,
                "num_directions": 8, "log_every": 5, "checkpoint_every": 1000, "seed": 3}
    settings.update(training)
    return {"model": {"hidden_size": 6}, "training": settings, "data": {"length": 25, "amplitude": 1.0}}


def small_net(hidden: int = 3, layers: int = 1, seed: int = 1):
    """Small weights and biases (a smooth loss, where finite differences are first-order exact) and a short wave."""
    model = perturbation.ModelSection(name="rnn_xhl" if layers > 1 else "rnn_1hl", hidden_size=hidden,
                                      num_layers=layers)
    gen = torch.Generator().manual_seed(seed)
    params = {key: 0.5 * value + 0.1 * torch.randn(value.shape, generator=gen, dtype=torch.float64)
              for key, value in perturbation.init_params(model, seed, torch.float64).items()}
    wave = perturbation.sine_data(perturbation.DataSection(length=12, amplitude=1.0, n_samples=1), seed,
                                  torch.float64)["train"]
    return params, wave[:, :-1], wave[:, 1:]


def reference_loss(params: dict, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """One net, one sequence at a time, plain matmuls: the loop the stacked forward must agree with."""
    names = perturbation.layer_names((len(params) - 2) // 3)
    total = 0.0
    for x, target in zip(inputs, targets):
        hs = [torch.zeros(params[whh].shape[0], dtype=x.dtype) for _, whh, _ in names]
        for t in range(len(x)):
            signal = x[t]
            for i, (wxh, whh, bh) in enumerate(names):
                hs[i] = torch.tanh(signal @ params[wxh] + hs[i] @ params[whh] + params[bh])
                signal = hs[i]
            total += float(((signal @ params["Why"] + params["by"]) - target[t]).square().sum())
    return total / len(inputs)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# ---- (a) the seed's own numbers ---------------------------------------------------------------------------
def test_the_seeds_weights_and_wave_give_its_first_logged_loss():
    """With training.seed 12 the weights are the seed's (numpy randn, same order); the seed's log starts at
    'Epoch: 0 | Train Loss: 17407.5103'. Its loss call passes (output, data), so it scores y[t] against x[t-1];
    our next-step loss scores y[t] against x[t+1], as its docstring says."""
    cfg = Config.model_validate(yaml.safe_load(SEED_CONFIG_YML))
    params = perturbation.init_params(cfg.model, 12, torch.float64)
    wave = perturbation.sine_data(cfg.data, 12, torch.float64)["train"]
    y, _ = perturbation.elman_forward(population.expand(params, 1), wave)
    assert round(float((y[0, :, 1:] - wave[:, :-1]).square().sum()), 4) == 17407.5103
    ours = perturbation.elman_losses(population.expand(params, 1), wave[:, :-1], wave[:, 1:])
    assert float(ours[0]) == pytest.approx(reference_loss(params, wave[:, :-1], wave[:, 1:]), rel=1e-12)


# ---- (b) gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_wp_gradient_matches_autograd(layers):
    params, inputs, targets = small_net(layers=layers)
    wp, loss, forwards = perturbation.wp_gradient(params, inputs, targets, sigma=1e-7, chunk=1000)
    exact, exact_loss, _ = perturbation.bptt_gradient(params, inputs, targets)
    n = sum(v.numel() for v in params.values())
    assert forwards == n + 1 and wp.shape == (n,)
    assert float(loss) == pytest.approx(float(exact_loss), rel=1e-12)
    assert torch.allclose(wp, exact, rtol=1e-4, atol=1e-5), (wp - exact).abs().max()


@pytest.mark.parametrize("method, layers, floor", [("spsa", 1, 0.97), ("np", 1, 0.97), ("np", 2, 0.9)])
def test_random_perturbations_estimate_the_gradient(method, layers, floor):
    params, inputs, targets = small_net(layers=layers)
    exact, _, _ = perturbation.bptt_gradient(params, inputs, targets)
    gen = torch.Generator().manual_seed(0)
    estimate = {"spsa": lambda k: perturbation.spsa_gradient(params, inputs, targets, 1e-5, k, gen, 100_000),
                "np": lambda k: perturbation.np_gradient(params, inputs, targets, 1e-5, k, gen)}[method]
    few, _, forwards = estimate(20)
    many, _, _ = estimate(4000)
    assert forwards == (41 if method == "spsa" else 21)
    assert cosine(many, exact) > floor
    assert cosine(many, exact) > cosine(few, exact)  # more directions, a better estimate


# ---- (c) the stacked forward is the loop, for P perturbations and for K configs ---------------------------
def test_batched_losses_equal_a_loop_over_perturbations():
    params, inputs, targets = small_net(hidden=4)
    w = perturbation.flatten(params)
    gen = torch.Generator().manual_seed(5)
    vectors = w + 1e-2 * torch.randn(9, w.numel(), generator=gen, dtype=torch.float64)
    batched = perturbation.member_losses(vectors, params, inputs, targets, chunk=4)  # chunks of 4, 4, 1
    looped = [reference_loss({k: t[0] for k, t in perturbation.unflatten(v.unsqueeze(0), params).items()},
                             inputs, targets) for v in vectors]
    assert torch.allclose(batched, torch.tensor(looped, dtype=torch.float64), rtol=1e-12, atol=0)
    one_by_one = torch.cat([perturbation.member_losses(v.unsqueeze(0), params, inputs, targets, 1) for v in vectors])
    assert torch.allclose(batched, one_by_one, rtol=1e-12, atol=0)


def test_k_configs_of_one_shape_share_the_stacked_forward():
    """Two configs (own weights, own data) x 3 perturbations each, as one forward of 6 members."""
    nets = [small_net(hidden=4, seed=s) for s in (1, 2)]
    stacks, inputs, targets = [], [], []
    for params, x, y in nets:
        w = perturbation.flatten(params)
        stacks.append(perturbation.unflatten(torch.stack([w, w + 1e-3, w - 1e-3]), params))
        inputs.append(x.unsqueeze(0).expand(3, *x.shape))
        targets.append(y.unsqueeze(0).expand(3, *y.shape))
    fused = {key: torch.cat([s[key] for s in stacks]) for key in stacks[0]}
    together = perturbation.elman_losses(fused, torch.cat(inputs), torch.cat(targets))
    apart = torch.cat([perturbation.elman_losses(s, x[0], y[0]) for s, x, y in zip(stacks, inputs, targets)])
    assert together.shape == (6,)
    assert torch.allclose(together, apart, rtol=1e-12, atol=0)
    assert not torch.allclose(together[:3], together[3:])  # the two configs really differ


# ---- (d) it learns, reports, and runs the FSM ------------------------------------------------------------
@pytest.mark.parametrize("method, lr", [("wp", 1e-3), ("spsa", 3e-4), ("bptt", 1e-3)])
def test_loss_goes_down_on_the_sine_task(tmp_path, method, lr):
    h = Harness(tmp_path)
    result = h.train(**tiny(method, learning_rate=lr, epochs=60))
    steps = [step for step, _ in h.reports]
    assert steps == list(range(5, 61, 5))
    losses = [values["train_loss"] for _, values in h.reports]
    assert losses[-1] < 0.5 * losses[0], losses
    n = result["weights"]
    assert n == 1 * 6 + 6 * 6 + 6 + 6 * 1 + 1
    per_epoch = {"wp": n + 1, "spsa": 2 * 8 + 1, "bptt": 1}[method] + 1  # + the validation forward
    assert [v["forwards"] for _, v in h.reports] == [s * per_epoch for s in steps]
    assert all(v["epoch_seconds"] > 0 and v["val_loss"] == v["train_loss"] for _, v in h.reports)  # one wave
    assert result["epochs"] == 60 and result["forwards"] == 60 * per_epoch
    assert result["train_loss"] < losses[0]
    saved = torch.load(result["weights_file"])
    assert saved.keys() == {"Wxh", "Whh", "bh", "Why", "by"}
    assert result["train_loss"] == pytest.approx(reference_loss(saved, *_wave(25)), rel=1e-9)


def _wave(length: int):
    wave = perturbation.sine_data(perturbation.DataSection(length=length, amplitude=1.0), 3, torch.float64)["train"]
    return wave[:, :-1], wave[:, 1:]


def test_fsm_generates_the_sequence_from_one_sample_and_reports_its_error(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny("bptt", epochs=30), fsm=True)
    saved = torch.load(result["weights_file"])
    target = perturbation.sine_data(perturbation.DataSection(length=25, amplitude=1.0), 3, torch.float64)["val"][0, :, 0]
    # the seed's FSM by hand: first sample in, every output fed back as the next input
    h_state, x, generated = torch.zeros(6, dtype=torch.float64), target[0:1], [float(target[0])]
    for _ in range(24):
        h_state = torch.tanh(x @ saved["Wxh"] + h_state @ saved["Whh"] + saved["bh"])
        x = h_state @ saved["Why"] + saved["by"]
        generated.append(float(x))
    expected = float((torch.tensor(generated, dtype=torch.float64) - target).square().mean())
    assert result["fsm_steps"] == 24
    assert result["fsm_mse"] == pytest.approx(expected, rel=1e-9)
    with open(result["fsm_plot"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_two_layer_net_trains_and_its_fsm_follows_the_stacked_forward(tmp_path):
    config = tiny("bptt", epochs=20)
    config["model"] = {"name": "rnn_xhl", "num_layers": 2, "hidden_size": 5}
    result = Harness(tmp_path).train(**config, fsm=True, fsm_steps=6)
    saved = torch.load(result["weights_file"])
    assert {"Wxh2", "Whh2", "bh2"} <= saved.keys() and saved["Wxh2"].shape == (5, 5)
    first = torch.tensor([0.3], dtype=torch.float64)
    generated = perturbation.fsm_rollout(saved, first, 3)
    # each rollout step is the stacked forward on the sequence generated so far
    y, _ = perturbation.elman_forward(population.expand(saved, 1), generated[:3].view(1, 3, 1))
    assert torch.allclose(generated[1:], y[0, 0, :, 0], rtol=1e-12, atol=1e-12)
    assert result["fsm_steps"] == 6 and result["fsm_mse"] >= 0


# ---- (e) checkpoint / resume is exact ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wp", "spsa", "np"])
def test_resume_after_a_stop_gives_the_uninterrupted_runs_weights(tmp_path, method):
    config = tiny(method, epochs=30, learning_rate=1e-4, checkpoint_every=10, log_every=1)
    straight = Harness(tmp_path / "a", seed=9)
    full = straight.train(**config)

    first = Harness(tmp_path / "b", seed=9, stop_at=17)
    assert first.train(**config) == {"stopped_at": 17}
    second = Harness(tmp_path / "b", seed=9, checkpoint=first.checkpoints[-1])
    resumed = second.train(**config)
    assert second.reports[0][0] == 18  # went on from epoch 17, not from 0

    a, b = straight.final_state(), second.final_state()
    assert a["step"] == b["step"] == 30
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), key
    assert torch.equal(a["generator"], b["generator"])

    def numbers(reports):
        return [(s, {k: v for k, v in values.items() if k != "epoch_seconds"}) for s, values in reports]
    assert numbers(straight.reports) == numbers(first.reports + second.reports)
    for key in ("train_loss", "val_loss", "forwards", "epochs", "loss_curve"):
        assert full[key] == resumed[key], key


# ---- (f) the seed's config.yml, and bad keys ---------------------------------------------------------------
def test_the_seeds_config_yml_parses_as_written():
    cfg = trainers.parse_config("perturbation", yaml.safe_load(SEED_CONFIG_YML))
    assert (cfg.model.name, cfg.model.input_size, cfg.model.hidden_size, cfg.model.output_size) == ("rnn_1hl", 1, 20, 1)
    t = cfg.training
    assert (t.gradient_computation, t.epochs, t.learning_rate, t.seed, t.perturbation) == ("wp", 2000, 1e-4, 12, 1e-3)
    assert (t.clip, t.max_clip_value, t.min_clip_value) == (True, 3, -3)
    assert (cfg.data.amplitude, cfg.data.frequency, cfg.data.phase, cfg.data.length) == (10.0, 1.0, 0.0, 100)
    assert cfg.log.experiment_name == "rnn_1hl on sine data"


def test_gridfleet_submit_config_yml_is_a_one_job_grid(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(SEED_CONFIG_YML)
    grid = load_grid_file(path)
    assert grid["trainer"] == "perturbation" and grid["name"] == "rnn_1hl-on-sine-data"
    assert grid["seeds"] == [12] and "seed" not in grid["config"]["training"]  # the job's seed is the seed's
    jobs = expand(GridSpec.model_validate(grid))
    assert len(jobs) == 1 and jobs[0].seed == 12
    cfg = trainers.parse_config("perturbation", jobs[0].config)
    assert cfg.training.epochs == 2000 and cfg.training.seed is None
    spec = tmp_path / "grid.yaml"  # a grid spec is not mistaken for a seed file
    spec.write_text(yaml.safe_dump({"name": "g", "trainer": "perturbation", "config": yaml.safe_load(SEED_CONFIG_YML)}))
    assert load_grid_file(spec)["name"] == "g"


@pytest.mark.parametrize("section, key, value, field", [
    ("training", "perturbaton", 0.01, "config.training.perturbaton"),  # misspelt: an error, not a default
    ("training", "perturbation", -1.0, "config.training.perturbation"),
    ("training", "gradient_computation", "adam", "config.training.gradient_computation"),
    ("model", "name", "lstm", "config.model.name"),
    ("model", "input_size", 3, "config"),  # the sine task has one feature
    ("data", "length", 2, "config.data.length"),
])
def test_bad_keys_are_rejected_naming_the_field(section, key, value, field):
    config = yaml.safe_load(SEED_CONFIG_YML)
    config.setdefault(section, {})[key] = value
    with pytest.raises(trainers.InvalidConfig) as info:
        trainers.validate_config("perturbation", config)
    assert field in [name for name, _ in info.value.errors], info.value.errors


def test_a_bad_key_is_a_422_naming_the_field(tmp_path):
    token = "gf_test_admin_token_0123456789abcdef"
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", admin_token=token,
                              home=tmp_path / "home"))
    config = yaml.safe_load(SEED_CONFIG_YML)
    config["training"]["perturbaton"] = 0.01
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}) as client:
        reply = client.post("/api/v1/grids", json={"name": "bad", "trainer": "perturbation", "config": config})
        assert reply.status_code == 422, reply.text
        assert "config.training.perturbaton" in [f["field"] for f in reply.json()["error"]["fields"]], reply.text
        config["training"].pop("perturbaton")
        good = client.post("/api/v1/grids", json={"name": "good", "trainer": "perturbation", "config": config})
        assert good.status_code == 201, good.text


def test_config_rejects_inverted_clip_and_layers_for_rnn_1hl():
    with pytest.raises(ValidationError, match="min_clip_value"):
        Config.model_validate({"training": {"min_clip_value": 1, "max_clip_value": -1}})
    with pytest.raises(ValidationError, match="rnn_xhl"):
        Config.model_validate({"model": {"num_layers": 2}})
    assert Config.model_validate({"model": {"name": "rnn_xhl", "num_layers": 2}}).model.num_layers == 2


def test_batched_losses_equal_the_loop_for_several_sequences_and_two_layers():
    """B > 1 sequences and a second layer take the time-major paths that one sequence does not."""
    params, _, _ = small_net(hidden=3, layers=2, seed=4)
    waves = perturbation.sine_data(perturbation.DataSection(length=9, amplitude=1.0, n_samples=3, phase="random",
                                                            train_split=1.0, validation_split=0.0), 4,
                                   torch.float64)["train"]
    inputs, targets = waves[:, :-1], waves[:, 1:]
    w = perturbation.flatten(params)
    vectors = w + 1e-2 * torch.randn(5, w.numel(), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    batched = perturbation.member_losses(vectors, params, inputs, targets, chunk=5)
    looped = [reference_loss({k: t[0] for k, t in perturbation.unflatten(v.unsqueeze(0), params).items()},
                             inputs, targets) for v in vectors]
    assert inputs.shape[0] == 3
    assert torch.allclose(batched, torch.tensor(looped, dtype=torch.float64), rtol=1e-12, atol=0)


# ---- (g) the seed's learning-rate schedules (its LearnerRateScheduler, `learning_rate: 'linear'`) -----------
def test_linear_and_step_schedules_follow_the_seeds_formulas():
    linear = perturbation.TrainingSection(learning_rate="linear", base_learning_rate=0.1, final_learning_rate=0.0,
                                          epochs=110)
    # warm-up 0 -> 0.1 over the seed's 10 epochs, then down to 0 at epoch 110, held there after
    assert [perturbation.learning_rate(linear, e) for e in (0, 5, 10, 60, 110, 200)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.05, 0.0, 0.0])
    step = perturbation.TrainingSection(learning_rate="step", base_learning_rate=1.0, warmup_epochs=5,
                                        decay_rate=0.7, decay_steps=10)
    # base * 0.7 ** (epoch // 10) after the warm-up, as the seed's int(step / decay_steps)
    assert [perturbation.learning_rate(step, e) for e in (0, 4, 5, 9, 10, 25)] == pytest.approx(
        [0.0, 0.8, 1.0, 1.0, 0.7, 0.49])
    constant = perturbation.TrainingSection(learning_rate="constant", base_learning_rate=0.01, warmup_epochs=0)
    assert perturbation.learning_rate(constant, 0) == perturbation.learning_rate(constant, 99) == 0.01
    assert perturbation.learning_rate(perturbation.TrainingSection(learning_rate=3e-4), 7) == 3e-4


@pytest.mark.parametrize("training, message", [
    ({"learning_rate": "linear", "base_learning_rate": 0.1}, "needs final_learning_rate"),
    ({"learning_rate": "step", "base_learning_rate": 0.1, "decay_rate": 0.7}, "needs decay_steps"),
    ({"learning_rate": "step"}, "needs base_learning_rate, decay_rate, decay_steps"),
    ({"learning_rate": 1e-4, "decay_rate": 0.7}, "decay_rate belong to a learning_rate schedule"),
    ({"learning_rate": "linear", "base_learning_rate": 0.1, "final_learning_rate": 0.0, "epochs": 10}, "must exceed"),
])
def test_schedule_keys_are_demanded_and_refused_by_name(training, message):
    with pytest.raises(ValidationError, match=message):
        Config.model_validate({"training": training})
    config = yaml.safe_load(SEED_CONFIG_YML)
    config["training"]["learning_rate"] = "cosine"
    with pytest.raises(trainers.InvalidConfig) as info:
        trainers.validate_config("perturbation", config)
    assert any(name.startswith("config.training.learning_rate") for name, _ in info.value.errors), info.value.errors


def test_training_steps_with_the_scheduled_rate_and_reports_it(tmp_path):
    config = tiny("bptt", epochs=12, log_every=1, learning_rate="step", base_learning_rate=1e-4, warmup_epochs=2,
                  decay_rate=0.5, decay_steps=4)
    h = Harness(tmp_path, seed=2)
    h.train(**config)
    rates = [values["learning_rate"] for _, values in h.reports]
    assert rates == pytest.approx([0.0, 5e-5, 1e-4, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5, 2.5e-5, 2.5e-5, 2.5e-5, 2.5e-5])
    # epoch 0 stepped with rate 0: the weights after it are the initial ones, so its loss repeats at epoch 1
    losses = [values["train_loss"] for _, values in h.reports]
    assert losses[0] == losses[1] and losses[2] != losses[1] and losses[-1] < losses[0]


def test_batched_losses_equal_the_loop_for_two_input_features():
    """The forward itself takes any input width (the sine task uses one): the addmm path, not the addcmul one."""
    model = perturbation.ModelSection(input_size=2, hidden_size=4)
    gen = torch.Generator().manual_seed(9)
    params = {k: 0.5 * v for k, v in perturbation.init_params(model, 9, torch.float64).items()}
    inputs = torch.randn(2, 7, 2, generator=gen, dtype=torch.float64)
    targets = torch.randn(2, 7, 1, generator=gen, dtype=torch.float64)
    w = perturbation.flatten(params)
    vectors = w + 1e-2 * torch.randn(4, w.numel(), generator=gen, dtype=torch.float64)
    batched = perturbation.member_losses(vectors, params, inputs, targets, chunk=4)
    looped = [reference_loss({k: t[0] for k, t in perturbation.unflatten(v.unsqueeze(0), params).items()},
                             inputs, targets) for v in vectors]
    assert torch.allclose(batched, torch.tensor(looped, dtype=torch.float64), rtol=1e-12, atol=0)
