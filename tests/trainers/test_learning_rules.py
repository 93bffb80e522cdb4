"""learning_rules (seed 004) on tiny short-trial CDI runs, with a real TrainerContext, Pipe, Event and LocalStore."""
from __future__ import annotations

import math

import harness  # tests/trainers/harness.py
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from worker import trainers
from worker.trainers import learning_rules, population
from worker.trainers.learning_rules import Config


class Harness(harness.Harness):
    def train(self, **config) -> dict:
        return super().train(learning_rules, config)

    def final_state(self) -> dict:
        return self.store.load(self.checkpoints[-1])


def tiny(**overrides) -> dict:
    """CDI N=2, 30-step trials, small batches: one epoch or generation in tens of milliseconds."""
    config = {"variance": 0.1, "N": 2, "trial_length": 30, "batch_size": 64, "validation_trials": 200,
              "log_every": 1, "checkpoint_every": 1000, "ff_error_trigger": 5}
    config.update(overrides)
    return config


def accuracies(h: Harness) -> list[float]:
    return [values["val_accuracy"] for _step, values in h.reports]


# ---- the task ---------------------------------------------------------------------------------------
def test_cdi_trials_have_the_seeds_statistics():
    cfg = Config(rule="bptt", N=3, variance=0.5, trial_length=400)
    gen = torch.Generator().manual_seed(0)
    inputs, targets = learning_rules.make_trials(cfg, 600, gen)
    assert inputs.shape == (400, 600, 6)
    signal, context = inputs[..., :3], inputs[..., 3:]
    # one context channel is 1 for the whole trial, the others 0
    assert set(context.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(context.sum(-1), torch.ones(400, 600))
    assert torch.equal(context, context[:1].expand_as(context))
    attended = context[0].argmax(-1)
    assert set(attended.tolist()) == {0, 1, 2}
    # a constant +-m under the noise: the time mean recovers it, the residual has std `variance`
    level = signal.mean(0)
    residual = signal - level
    assert residual.std().item() == pytest.approx(0.5, rel=0.02)
    magnitude = level.abs()
    assert magnitude.max().item() < 0.1857 + 4 * 0.5 / math.sqrt(400)
    # every channel of a trial has the same |m| (within the noise), signs drawn per channel
    assert (magnitude - magnitude.mean(-1, keepdim=True)).abs().max().item() < 8 * 0.5 / math.sqrt(400)
    assert 0.3 < (torch.sign(level) > 0).float().mean().item() < 0.7
    # the target is the sign of the attended channel's mean
    noiseless = Config(rule="bptt", N=3, variance=0.0, trial_length=5)
    clean, clean_targets = learning_rules.make_trials(noiseless, 2000, torch.Generator().manual_seed(1))
    attended = clean[0, :, 3:].argmax(-1)
    picked = clean[0, torch.arange(2000), attended]
    assert torch.equal(clean_targets, torch.sign(picked))
    assert picked.abs().max().item() <= 0.1857 and picked.abs().min().item() >= 0.0
    assert 0.1857 * 0.9 < picked.abs().max().item()  # m = U(0,1) * 0.1857 covers the range
    assert picked.abs().mean().item() == pytest.approx(0.1857 / 2, rel=0.05)


def test_rdm_trials_have_one_noisy_channel_and_targets_plus_minus_one():
    cfg = Config(rule="ga", rdm=True, variance=1.0, trial_length=300)
    inputs, targets = learning_rules.make_trials(cfg, 800, torch.Generator().manual_seed(2))
    assert inputs.shape == (300, 800, 1)
    assert set(targets.unique().tolist()) == {-1.0, 1.0}
    level = inputs.mean(0)[:, 0]
    assert (inputs - inputs.mean(0)).std().item() == pytest.approx(1.0, rel=0.02)
    # the channel's mean carries the target's sign (up to noise of std 1/sqrt(300))
    agree = (torch.sign(level) == targets).float().mean().item()
    assert 0.6 < agree < 0.95


def test_validation_set_is_the_seeds_ladder_and_rebuilds_identically():
    cfg = Config(rule="bptt", variance=0.0, trial_length=4, validation_trials=40)
    inputs, targets = learning_rules.validation_set(cfg, "cpu", seed=3)
    again = learning_rules.validation_set(cfg, "cpu", seed=3)
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    ladder = torch.linspace(0, 0.1875, 20)
    assert torch.allclose(inputs[0, :, :2].abs().max(-1).values, ladder.repeat(2))
    assert (targets[::20] == 0).all()  # mean 0: the seed's target is sign(0) = 0


def test_accuracy_counts_as_the_seed_does():
    targets = torch.tensor([1.0, -1.0, 0.0, 1.0])
    assert learning_rules.accuracy(torch.tensor([0.3, -0.2, 5.0, -0.1]), targets).item() == 0.75
    assert learning_rules.accuracy(torch.tensor([0.3, 0.2, -5.0, 0.1]), targets).item() == 0.75
    assert learning_rules.accuracy(torch.tensor([-0.3, 0.2, 0.0, -0.1]), targets).item() == 0.25


def test_stop_rule_is_the_min_of_the_last_ten():
    rule = learning_rules.StopRule(10, 0.9)
    for _ in range(9):
        rule.add(1.0)
    assert not rule.met  # fewer than ten validations
    rule.add(0.95)
    assert rule.met and rule.level == 0.95
    rule.add(0.5)
    assert not rule.met
    for _ in range(9):
        rule.add(0.92)
    assert not rule.met  # the 0.5 is still among the last ten
    rule.add(0.92)
    assert rule.met


# ---- the network --------------------------------------------------------------------------------------
def test_init_is_the_seeds():
    cfg = Config(rule="ga", N=2, hidden_size=200, g=1.5)
    net = learning_rules.init_network(cfg, torch.Generator().manual_seed(0), members=3)
    assert net["J_in"].shape == (3, 200, 4) and net["J_rec"].shape == (3, 200, 200) and net["J_out"].shape == (3, 1, 200)
    assert net["J_in"].std().item() == pytest.approx(0.5, rel=0.05)
    assert net["J_rec"].std().item() == pytest.approx(1.5 ** 2 / 200, rel=0.02)
    assert net["J_out"].std().item() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(net["b"], torch.zeros(3, 200))


@pytest.mark.parametrize("dynamics", ["tanh", "seed"])
def test_one_step_of_the_forward_is_the_rate_equation(dynamics):
    cfg = Config(rule="bptt", hidden_size=5, N=1)
    gen = torch.Generator().manual_seed(4)
    net = learning_rules.init_network(cfg, gen, members=2)
    net["b"] = torch.randn(2, 5, generator=gen)
    u, h0 = torch.randn(1, 3, 2, generator=gen), torch.randn(3, 5, generator=gen)
    out, states = learning_rules.run(net, u, h0, 0.1, dynamics, keep_states=True)
    for p in range(2):
        J_in, J_rec, J_out, b = (net[k][p] for k in learning_rules.MATRICES)
        phi = torch.tanh(h0.T) + (1.0 if dynamics == "seed" else 0.0)
        h = 0.9 * h0.T + 0.1 * (J_in @ u[0].T + J_rec @ phi + b[:, None])
        y = J_out @ h if dynamics == "seed" else torch.tanh(J_out @ torch.tanh(h))
        assert torch.allclose(states[0, p], h.T, atol=1e-6)
        assert torch.allclose(out[0, p], y[0], atol=1e-6)


@pytest.mark.parametrize("dynamics", ["tanh", "seed"])
def test_the_in_place_forward_equals_the_autograd_one(dynamics):
    """GA fitness and validation run in place without autograd; BPTT's forward builds the graph: same numbers."""
    gen = torch.Generator().manual_seed(8)
    net = learning_rules.init_network(Config(rule="ga", hidden_size=9, N=2), gen, members=4)
    net["b"] = 0.1 * torch.randn(4, 9, generator=gen)
    u, h0 = torch.randn(30, 4, 6, 4, generator=gen), torch.randn(6, 9, generator=gen)
    with torch.no_grad():
        out, states = learning_rules.run(net, u, h0, 0.1, dynamics, keep_states=True)
    leaves = {k: v.clone().requires_grad_(True) for k, v in net.items()}
    graph_out, graph_states = learning_rules.run(leaves, u, h0, 0.1, dynamics, keep_states=True)
    assert graph_out.requires_grad and not out.requires_grad
    assert torch.allclose(out, graph_out.detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(states, graph_states.detach(), rtol=1e-5, atol=1e-6)
    assert states[-1].std() > 0.1  # not a faded-out network


def test_batched_fitness_equals_a_per_member_loop():
    cfg = Config(rule="ga", population=7, trial_length=25, hidden_size=12)
    gen = torch.Generator().manual_seed(5)
    pop = learning_rules.init_network(cfg, gen, members=7)
    inputs, targets = learning_rules.make_trials(cfg, 33, gen)
    h0 = learning_rules.initial_states(cfg, 33, gen)
    batched = learning_rules.fitness(cfg, pop, inputs, targets, h0)
    looped = torch.stack([learning_rules.fitness(cfg, population.expand(population.member(pop, p), 1),
                                                 inputs, targets, h0)[0] for p in range(7)])
    assert batched.shape == (7,)
    assert torch.allclose(batched, looped, rtol=1e-5, atol=1e-6)
    assert batched.std() > 0  # the members really differ


def test_one_batched_forward_serves_members_with_their_own_trials():
    """Configs of a grid that differ in variance (or seed) share one forward: inputs [T, P, B, I]."""
    gen = torch.Generator().manual_seed(7)
    nets, trials = [], []
    for variance in (0.1, 0.5, 1.0):
        cfg = Config(rule="bptt", variance=variance, trial_length=20, hidden_size=10)
        nets.append(population.member(learning_rules.init_network(cfg, gen), 0))
        trials.append(learning_rules.make_trials(cfg, 16, gen)[0])
    h0 = torch.randn(3, 16, 10, generator=gen)
    together = learning_rules.run(population.stack(nets), torch.stack(trials, dim=1), h0, 0.1)
    for p in range(3):
        alone = learning_rules.run(population.expand(nets[p], 1), trials[p], h0[p], 0.1)
        assert torch.allclose(together[:, p], alone[:, 0], atol=1e-6)
    assert not torch.allclose(together[:, 0], together[:, 1])


def test_ga_populations_of_several_configs_share_one_fitness_forward():
    """Two GA configs of a grid (variance 0.1 and 1.0, own seeds and trials): one concat population, one forward,
    and each config's fitness equals its own forward's."""
    parts = []
    for seed, variance in ((1, 0.1), (2, 1.0)):
        cfg = Config(rule="ga", population=3, parents=2, variance=variance, trial_length=20, hidden_size=8)
        gen = torch.Generator().manual_seed(seed)
        pop = learning_rules.init_network(cfg, gen, members=3)
        inputs, targets = learning_rules.make_trials(cfg, 12, gen)
        h0 = learning_rules.initial_states(cfg, 1, gen).expand(12, 8)
        parts.append((cfg, pop, inputs, targets, h0))
    whole, slices = population.concat([pop for _, pop, _, _, _ in parts])
    inputs = torch.cat([x.unsqueeze(1).expand(-1, 3, -1, -1) for _, _, x, _, _ in parts], dim=1)  # [T, 6, B, I]
    targets = torch.cat([t.expand(3, -1) for _, _, _, t, _ in parts])  # [6, B]
    h0 = torch.cat([h.expand(3, -1, -1) for _, _, _, _, h in parts])  # [6, B, H]
    together = learning_rules.fitness(parts[0][0], whole, inputs, targets, h0)
    for (cfg, pop, x, t, h), members in zip(parts, slices):
        assert torch.allclose(together[members], learning_rules.fitness(cfg, pop, x, t, h), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together[slices[0]], together[slices[1]])


def test_next_generation_keeps_the_best_and_mutates_children_of_the_five_best():
    cfg = Config(rule="ga", population=12, hidden_size=6, mutation=0.005)
    gen = torch.Generator().manual_seed(6)
    pop = learning_rules.init_network(cfg, gen, members=12)
    losses = torch.randn(12, generator=gen)
    children = learning_rules.next_generation(cfg, pop, losses, gen)
    ranked = torch.argsort(losses)
    best, parents = int(ranked[0]), ranked[:5].tolist()
    for key in learning_rules.MATRICES:
        assert torch.equal(children[key][0], pop[key][best]), key
    for c in range(1, 12):
        # each child is one of the five best plus 0.005 * N(0,1) noise on J_in, J_rec, J_out; b unchanged
        distances = [float((children["J_rec"][c] - pop["J_rec"][p]).abs().max()) for p in parents]
        parent = parents[int(np.argmin(distances))]
        noise = torch.cat([(children[k][c] - pop[k][parent]).flatten() for k in ("J_in", "J_rec", "J_out")])
        assert noise.std().item() == pytest.approx(0.005, rel=0.3)
        assert torch.equal(children["b"][c], pop["b"][parent])
    used = {int(np.argmin([float((children["J_rec"][c] - pop["J_rec"][p]).abs().max()) for p in parents]))
            for c in range(1, 12)}
    assert len(used) > 1  # parents are picked at random, not always the best


def test_one_rls_update_matches_its_definition():
    """A hand-built case: P0 = I / alpha, one rate vector r and readout w with target 1."""
    alpha = 4.0
    P0 = torch.eye(3, dtype=torch.float64) / alpha
    r = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = torch.tensor([[0.2, 0.1, -0.3]], dtype=torch.float64)
    P, k = learning_rules.rls_update(P0, r)
    # Sherman-Morrison: after one update P is the inverse of (alpha I + r r')
    assert torch.allclose(P, torch.linalg.inv(alpha * torch.eye(3, dtype=torch.float64) + torch.outer(r, r)))
    assert torch.allclose(k, P @ r)
    assert torch.allclose(k, r / (alpha + r @ r))  # P0 r / (1 + r' P0 r) written out
    err = w @ r - 1.0
    w_new = w - torch.outer(err, k)
    # the error on r shrinks by 1 / (1 + r' P0 r), and w moves only along r
    assert torch.allclose(w_new @ r - 1.0, err / (1.0 + r @ P0 @ r))
    delta = (w_new - w)[0]
    assert torch.allclose(delta, (delta @ r) / (r @ r) * r)


# ---- each rule learns -----------------------------------------------------------------------------------
def _improves(values: list[float], margin: float) -> None:
    first, last = np.mean(values[:3]), np.mean(values[-5:])
    assert last > first + margin, values


def test_bptt_improves_accuracy(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(rule="bptt", lr=3e-3, trainable=["J_in", "J_rec", "J_out"], variance=0.05, max_steps=60))
    _improves(accuracies(h), 0.15)
    assert result["steps"] == 60 and result["val_accuracy"] == accuracies(h)[-1]


def test_ga_improves_accuracy(tmp_path):
    h = Harness(tmp_path)
    h.train(**tiny(rule="ga", population=20, mutation=0.02, batch_size=128, max_steps=40))
    _improves(accuracies(h), 0.1)


def test_ff_improves_accuracy(tmp_path):
    # alpha 100, not 1e4: P0 = I / 1e4 is a ridge that 750-step trials wear down over hundreds of trials
    h = Harness(tmp_path)
    h.train(**tiny(rule="ff", ff_alpha=100.0, variance=0.02, mean=1.0, trial_length=60, ff_error_trigger=10,
                   max_steps=60))
    _improves(accuracies(h), 0.1)


def test_a_rule_stops_when_the_last_ten_validations_reach_the_threshold(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(rule="bptt", stop_accuracy=0.3, max_steps=500))
    values = accuracies(h)
    assert result["converged"] is True and result["steps"] == len(values) >= 10
    assert min(values[-10:]) >= 0.3 and result["stop_accuracy"] == min(values[-10:])
    assert len(values) == 10 or min(values[-11:-1]) < 0.3  # it stopped at the first chance


# ---- checkpoint / resume is exact -----------------------------------------------------------------------
@pytest.mark.parametrize("rule, extra", [("bptt", {"trainable": ["J_rec", "J_out"]}), ("ga", {"population": 8}),
                                         ("ff", {"ff_alpha": 10.0})])
def test_stop_and_resume_gives_the_same_run_as_an_uninterrupted_one(tmp_path, rule, extra):
    config = tiny(rule=rule, max_steps=8, batch_size=16, validation_trials=50, trial_length=12, **extra)
    straight = Harness(tmp_path / "a", seed=9)
    full = straight.train(**config)

    first = Harness(tmp_path / "b", seed=9, stop_at=3)
    assert first.train(**config) == {"stopped_at": 3}
    saved = first.final_state()
    assert saved["step"] == 3 and len(saved["run"]["history"]) == 3
    second = Harness(tmp_path / "b", seed=9, checkpoint=first.checkpoints[-1])
    resumed = second.train(**config)
    assert second.reports[0][0] == 4  # it went on from step 3

    assert first.reports + second.reports == straight.reports
    a, b = straight.final_state(), second.final_state()
    assert a["step"] == b["step"] == 8
    assert torch.equal(a["generator"], b["generator"])
    for key in learning_rules.MATRICES:
        assert torch.equal(a["params"][key], b["params"][key]), key
    if rule == "bptt":
        for key, value in a["optimizer"]["state"].items():
            assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
            assert torch.equal(value["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    if rule == "ga":
        for key in learning_rules.MATRICES:
            assert torch.equal(a["population"][key], b["population"][key]), key
        assert a["population"]["J_rec"].shape == (8, 50, 50)
    if rule == "ff":
        assert torch.equal(a["P"], b["P"])
        assert torch.equal(a["learner"]["J_rec"], b["learner"]["J_rec"])
    for key in ("steps", "converged", "val_accuracy", "stop_accuracy", "accuracy_curve"):
        assert full[key] == resumed[key], key
    assert np.array_equal(np.load(full["matrices"])["J_rec"], np.load(resumed["matrices"])["J_rec"])


# ---- the result: trained matrices an analysis can read ---------------------------------------------------
def test_result_points_at_the_trained_matrices(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(model_name="ga_0050", population=6, max_steps=2))
    saved = learning_rules.load_matrices(result["matrices"])
    assert result["rule"] == saved["rule"] == "ga" and saved["task"] == "cdi" and saved["contexts"] == 2
    assert saved["J_in"].shape == (50, 4) and saved["J_rec"].shape == (50, 50)
    assert saved["J_out"].shape == (1, 50) and saved["b"].shape == (50,)
    assert saved["dt"] == pytest.approx(0.1) and saved["dynamics"] == "tanh"
    final = h.final_state()
    assert np.array_equal(saved["J_rec"], final["params"]["J_rec"].numpy())
    assert np.array_equal(saved["J_rec"], final["population"]["J_rec"][0].numpy())  # the kept best


def test_the_seeds_bptt_dynamics_train_and_are_saved_with_the_matrices(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(rule="bptt", dynamics="seed", max_steps=3))
    saved = learning_rules.load_matrices(result["matrices"])
    assert saved["dynamics"] == "seed" and result["steps"] == 3
    assert all(math.isfinite(values["loss"]) for _step, values in h.reports)


# ---- the config: the seed's command-line options --------------------------------------------------------
def test_config_accepts_the_seeds_command_line_options():
    cdi = Config.model_validate({"model_name": "bptt_0050", "-v": 0.1, "--N": 3})
    assert (cdi.rule, cdi.variance, cdi.contexts, cdi.task, cdi.inputs) == ("bptt", 0.1, 3, "cdi", 6)
    assert cdi.learning_rate == 1e-4  # N-CDI
    rdm = Config.model_validate({"model_name": "ff_model", "v": 1.0, "--rdm": True})
    assert (rdm.rule, rdm.task, rdm.inputs, rdm.alpha, rdm.population_size) == ("ff", "rdm", 1, 5e4, 50)
    ga = Config.model_validate({"model_name": "genetic_1", "--context": True, "-m": 0.2})
    assert (ga.rule, ga.contexts, ga.mean, ga.population_size, ga.alpha, ga.learning_rate) == ("ga", 2, 0.2, 20, 1e4, 5e-4)
    plain = Config.model_validate({"rule": "bptt"})
    assert (plain.task, plain.contexts, plain.variance, plain.hidden_size, plain.trial_length) == ("cdi", 2, 0.5, 50, 750)
    assert (plain.step_cap, Config(rule="ga").step_cap, Config(rule="ff").step_cap) == (20_000, 2_000, 5_000)


@pytest.mark.parametrize("config, field", [
    ({"rule": "bptt", "hidden_size": 0}, "hidden_size"), ({"rule": "sgd"}, "rule"),
    ({"rule": "bptt", "--relu": True}, "--relu"), ({"rule": "bptt", "variance": -1}, "variance"),
    ({"rule": "bptt", "trainable": ["W"]}, "trainable")])
def test_config_rejects_bad_values_naming_the_field(config, field):
    with pytest.raises(trainers.InvalidConfig) as info:
        trainers.validate_config("learning_rules", config)
    assert any(name.startswith(f"config.{field}") for name, _msg in info.value.errors), info.value.errors


@pytest.mark.parametrize("config, message", [
    ({"model_name": "sgd_1"}, "must start with bptt, ga or ff"), ({}, "give rule"),
    ({"model_name": "bptt_1", "rule": "ga"}, "contradicts"), ({"rule": "bptt", "rdm": True, "N": 3}, "one of them"),
    ({"rule": "ff", "trial_length": 100}, "ff_error_trigger"), ({"rule": "ga", "population": 3}, "parents")])
def test_config_rejects_contradictions_with_a_message(config, message):
    with pytest.raises(ValidationError, match=message):
        Config.model_validate(config)


# ---- the example grid ------------------------------------------------------------------------------------
def test_example_grid_is_rule_by_variance_by_seed_on_cdi_2():
    from pathlib import Path

    import yaml

    from scheduler.spec import GridSpec, expand, validate_jobs

    path = Path(__file__).resolve().parents[2] / "examples" / "seed004_grid.yaml"
    spec = GridSpec.model_validate(yaml.safe_load(path.read_text()))
    jobs = expand(spec)
    validate_jobs(spec, jobs, trainers.validate_config)
    cells = {(Config.model_validate(j.config).rule, Config.model_validate(j.config).variance, j.seed) for j in jobs}
    assert cells == {(r, v, s) for r in ("bptt", "ga", "ff") for v in (0.1, 0.5, 1.0) for s in (0, 1)}
    assert len(jobs) == 18
    for j in jobs:
        cfg = Config.model_validate(j.config)
        assert (cfg.task, cfg.contexts, cfg.hidden_size) == ("cdi", 2, 50)
        assert cfg.trial_length < 750 and cfg.max_steps is not None  # the short-trial setting
