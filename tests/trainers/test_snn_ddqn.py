"""snn_ddqn (seed 002) on tiny CPU runs, with a real TrainerContext, Pipe, Event and LocalStore."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import gymnasium as gym
import harness  # tests/trainers/harness.py
import numpy as np
import pytest
import snntorch as snn
import torch
from pydantic import ValidationError

from scheduler.spec import GridSpec, expand
from worker import trainers
from worker.trainers import snn_ddqn
from worker.trainers.snn_ddqn import Config, QNetwork, td_target
from worker.trainers.spiking import lif

# Box2D's SWIG bindings warn about their own types when LunarLander first imports them.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type swig:DeprecationWarning",
                                        "ignore:builtin type Swig:DeprecationWarning")

SEED_CONF = {  # seed 002's conf.json, as its README writes it
    "name": "SNN_DDQN", "continue_run": True, "agents": 1, "hidden_layers": [64, 64], "learning_rate": 0.0004,
    "decay": 0.998, "batch": 100, "gamma": 0.995, "extra_info": "", "max_run_time": 12600,
    "stop_learning_at_win_percent": 80, "train_max_time": 12600, "upload_to_cloud": False, "local_backup": True,
    "architecture": "snn", "snn_tSteps": 25, "snn_beta": 0.95, "debug": True,
}


class Harness(harness.Harness):
    def train(self, **config) -> dict:
        return super().train(snn_ddqn, config)

    def final_state(self) -> dict:
        return self.store.load(self.checkpoints[-1])


def tiny(**overrides) -> dict:
    config = {"env_id": "CartPole-v1", "episodes": 5, "max_episode_steps": 25, "agents": 2, "hidden_layers": [8],
              "snn_tSteps": 3, "batch": 8, "buffer_size": 200, "update_every": 2, "decay": 0.7,
              "learning_rate": 0.01, "checkpoint_every": 2}
    config.update(overrides)
    return config


class ContextBandit(gym.Env):
    """One step per episode: the observation lights one of two lamps; naming the lit one pays 1."""

    observation_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.lamp = int(self.np_random.integers(2))
        return np.eye(2, dtype=np.float32)[self.lamp], {}

    def step(self, action):
        return np.zeros(2, np.float32), float(action == self.lamp), True, False, {}


gym.register("GridfleetContextBandit-v0", entry_point=ContextBandit)


def deterministic(reports: list) -> list:
    """Reports without the wall-clock metric."""
    return [(step, {k: v for k, v in values.items() if k != "steps_per_second"}) for step, values in reports]


# ---- (a) tiny runs: both architectures, CartPole and LunarLander ----------------------------------------
@pytest.mark.parametrize("architecture", ["snn", "ann"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "LunarLander-v3"])
def test_tiny_run(tmp_path, env_id, architecture):
    config = tiny(env_id=env_id, architecture=architecture)
    h = Harness(tmp_path)
    result = h.train(**config)
    reports = h.reports
    assert [step for step, _ in reports] == [1, 2, 3, 4, 5]
    lengths = [values["length"] for _, values in reports]
    assert all(1 <= n <= 25 for n in lengths)
    # Two agents: both run until the 5th episode ends, so the steps are the 5 episodes' plus what the
    # other lane had done by then (at most one episode's worth).
    assert sum(lengths) <= result["env_steps"] <= sum(lengths) + 25
    # An update every 2 env steps once the buffer holds a batch of 8.
    expected_updates = sum(1 for k in range(1, result["env_steps"] + 1) if k % 2 == 0 and min(k, 200) >= 8)
    assert result["updates"] == expected_updates
    assert [values["epsilon"] for _, values in reports] == pytest.approx([0.7 ** i for i in range(5)])
    assert result["epsilon"] == pytest.approx(0.7 ** 5)
    returns = [values["return"] for _, values in reports]
    assert result["mean_return"] == pytest.approx(np.mean(returns))
    assert [values["mean_return"] for _, values in reports] == pytest.approx(
        [np.mean(returns[:i + 1]) for i in range(5)])
    assert any(values["loss"] is not None and np.isfinite(values["loss"]) for _, values in reports)
    assert all(values["steps_per_second"] > 0 for _, values in reports)
    assert result["stopped"] == "episodes" and result["episodes"] == 5
    state = h.final_state()
    assert state["step"] == 5 and state["buffer"]["size"] == min(result["env_steps"], 200)
    assert all(lane is None for lane in state["lanes"])
    if env_id == "CartPole-v1":
        assert returns == lengths  # +1 per step
    # The target net trails the online net by tau = 0.001 per update: close, but not equal.
    for name, value in state["online"].items():
        if name.endswith("weight"):
            assert not torch.equal(value, state["target"][name]), name


@pytest.mark.parametrize("architecture", ["ann", "snn"])
def test_it_learns_a_two_lamp_bandit(tmp_path, architecture):
    """Any registered Gymnasium id works; greedy (epsilon -> 0) play names the lit lamp every time."""
    h = Harness(tmp_path, seed=1)
    result = h.train(env_id="GridfleetContextBandit-v0", architecture=architecture, episodes=60, agents=4,
                     hidden_layers=[16], snn_tSteps=5, batch=16, buffer_size=1000, update_every=1,
                     learning_rate=0.02, decay=0.9, epsilon_min=0.0, win_by="return", win_threshold=0.5,
                     win_window=20, stop_learning_at_win_percent=None)
    assert result["epsilon"] < 0.01
    assert result["win_rate"] == 100.0, [values["return"] for _, values in h.reports]
    assert [values["return"] for _, values in h.reports[:20]].count(1.0) < 20  # it did not start out knowing


@pytest.mark.parametrize("update, extra", [("hard", {"target_update_every": 1}), ("soft", {"tau": 1.0})])
def test_target_equals_online_after_a_full_copy(tmp_path, update, extra):
    h = Harness(tmp_path)
    h.train(**tiny(architecture="ann", episodes=3, agents=1, target_update=update, **extra))
    state = h.final_state()
    for name, value in state["online"].items():
        assert torch.equal(value, state["target"][name]), name


def test_plain_dqn_target_and_membrane_readout_run(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(target="dqn", readout="membrane", episodes=3))
    assert result["episodes"] == 3 and result["updates"] > 0


# ---- (b) checkpoint / resume is exact -----------------------------------------------------------------
@pytest.mark.parametrize("env_id, architecture, steps", [("CartPole-v1", "snn", 25), ("LunarLander-v3", "ann", 300)])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, env_id, architecture, steps):
    # Two agents: when episode 3 ends and the stop comes, the other lane is mid-episode; resume replays it
    # (LunarLander's engines draw from the env's RNG at every step: the replay must reproduce that too).
    config = tiny(env_id=env_id, architecture=architecture, episodes=6, checkpoint_every=100,
                  max_episode_steps=steps)
    straight = Harness(tmp_path / "a", seed=5)
    full = straight.train(**config)

    first = Harness(tmp_path / "b", seed=5, stop_at=3)
    assert first.train(**config) == {"stopped_at": 3}
    saved = first.final_state()
    assert saved["step"] == 3
    assert any(lane is not None and lane["actions"] for lane in saved["lanes"]), "no episode was in flight"
    second = Harness(tmp_path / "b", seed=5, checkpoint=first.checkpoints[-1])
    resumed = second.train(**config)

    # It went on from episode 4 with the same replay buffer size and epsilon the checkpoint held.
    assert second.reports[0][0] == 4
    assert not second.of("event")  # the replayed episodes reached the saved observations exactly
    assert second.reports[0][1]["epsilon"] == pytest.approx(saved["run"]["epsilon"])
    assert saved["run"]["epsilon"] == pytest.approx(0.7 ** 3)
    assert deterministic(first.reports) + deterministic(second.reports) == deterministic(straight.reports)
    a, b = straight.final_state(), second.final_state()
    for net in ("online", "target"):
        for name in a[net]:
            assert torch.equal(a[net][name], b[net][name]), (net, name)
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
        assert torch.equal(value["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    assert a["buffer"]["size"] == b["buffer"]["size"] and a["buffer"]["pos"] == b["buffer"]["pos"]
    for name in ("obs", "actions", "rewards", "next_obs", "terminated"):
        assert np.array_equal(a["buffer"][name], b["buffer"][name]), name
    assert a["rng"] == b["rng"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    run_a = {k: v for k, v in a["run"].items() if k != "elapsed"}
    run_b = {k: v for k, v in b["run"].items() if k != "elapsed"}
    assert json.dumps(run_a, sort_keys=True) == json.dumps(run_b, sort_keys=True)
    for key in ("episodes", "env_steps", "updates", "mean_return", "win_rate", "epsilon", "return_curve"):
        assert full[key] == resumed[key], key


# ---- (c) the Double DQN target, by hand --------------------------------------------------------------
class TableNet(torch.nn.Module):
    """Q(s, .) = table[s] for a one-hot state s."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return obs @ self.table


def test_double_dqn_target_on_a_hand_built_batch():
    online = TableNet([[1.0, 5.0, 2.0],    # state 0: online picks action 1
                       [9.0, 0.0, 3.0]])   # state 1: online picks action 0
    target = TableNet([[4.0, -2.0, 7.0],   # target values action 1 at -2 (its own max is 7)
                       [0.5, 8.0, 6.0]])   # target values action 0 at 0.5 (its own max is 8)
    next_obs = torch.eye(2)[[0, 1, 1]]
    rewards = torch.tensor([1.0, 2.0, 3.0])
    terminated = torch.tensor([0.0, 0.0, 1.0])
    ddqn = td_target(online, target, rewards, next_obs, terminated, gamma=0.5, rule="ddqn")
    assert ddqn.tolist() == [1.0 + 0.5 * -2.0, 2.0 + 0.5 * 0.5, 3.0]
    dqn = td_target(online, target, rewards, next_obs, terminated, gamma=0.5, rule="dqn")
    assert dqn.tolist() == [1.0 + 0.5 * 7.0, 2.0 + 0.5 * 8.0, 3.0]


# ---- (d) the spiking network -------------------------------------------------------------------------
def test_spike_readout_counts_spikes_and_gradients_flow():
    torch.manual_seed(0)
    net = QNetwork(4, 3, Config(env_id="CartPole-v1", hidden_layers=[32, 16], snn_tSteps=10))
    q = net(torch.randn(64, 4) * 3)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 10 and q.max() > 0
    q.sum().backward()  # through the surrogate gradient of every Leaky layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_membrane_readout_is_not_limited_to_spike_counts():
    torch.manual_seed(0)
    net = QNetwork(4, 3, Config(env_id="CartPole-v1", hidden_layers=[16], snn_tSteps=5, readout="membrane"))
    q = net(torch.randn(32, 4) * 3)
    assert not torch.equal(q, q.round())
    assert q.min() < 0  # the output neurons integrate without reset: any value


def test_more_time_steps_more_spikes():
    torch.manual_seed(0)
    short = QNetwork(4, 3, Config(env_id="CartPole-v1", hidden_layers=[16], snn_tSteps=5))
    long = QNetwork(4, 3, Config(env_id="CartPole-v1", hidden_layers=[16], snn_tSteps=40))
    long.load_state_dict(short.state_dict())
    x = torch.randn(32, 4) * 3
    assert long(x).sum() > short(x).sum()


# ---- (e) winning and stopping ------------------------------------------------------------------------
def test_learning_stops_when_the_win_rate_exceeds_the_percent(tmp_path):
    # Every CartPole episode returns more than 1, so the win rate is 100% once the window (3) is full.
    h = Harness(tmp_path)
    config = tiny(architecture="ann", episodes=50, agents=1, win_by="return", win_threshold=1.0, win_window=3,
                  stop_learning_at_win_percent=99.5)
    result = h.train(**config)
    assert (result["stopped"], result["solved"], result["solved_at_episode"], result["episodes"]) == (
        "solved", True, 3, 3)
    assert [values["win_rate"] for _, values in h.reports] == [100.0, 100.0, 100.0]
    assert h.final_state()["step"] == 3
    again = Harness(tmp_path, checkpoint=h.checkpoints[-1])  # a retried attempt of a solved job
    assert again.train(**config)["stopped"] == "solved" and not again.reports

    never = Harness(tmp_path / "never")
    result = never.train(**tiny(architecture="ann", episodes=4, agents=1, win_by="return", win_threshold=1e9,
                                win_window=3))
    assert (result["stopped"], result["solved"], result["episodes"], result["win_rate"]) == ("episodes", False, 4, 0.0)


def test_a_win_is_a_final_reward_above_75_by_default():
    cfg = Config()
    assert snn_ddqn.is_win(cfg, final_reward=100.0, episode_return=-50.0)      # landed: +100 bonus
    assert not snn_ddqn.is_win(cfg, final_reward=-100.0, episode_return=250.0)  # crashed
    assert not snn_ddqn.is_win(cfg, final_reward=75.0, episode_return=0.0)
    by_return = Config(win_by="return", win_threshold=200.0)
    assert snn_ddqn.is_win(by_return, final_reward=-1.0, episode_return=201.0)


def test_training_time_limit_ends_the_run(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(architecture="ann", episodes=1000, train_max_time=0.001))
    assert result["stopped"] == "time_limit" and result["episodes"] < 1000
    assert h.checkpoints  # where it stopped is saved


# ---- (f) the config: seed 002's conf.json as written --------------------------------------------------
def test_the_seeds_conf_json_is_accepted_as_written():
    cfg = trainers.parse_config("snn_ddqn", SEED_CONF)
    assert (cfg.architecture, cfg.hidden_layers, cfg.snn_tSteps, cfg.snn_beta, cfg.learning_rate, cfg.batch,
            cfg.decay, cfg.gamma, cfg.agents, cfg.stop_learning_at_win_percent) == (
        "snn", [64, 64], 25, 0.95, 0.0004, 100, 0.998, 0.995, 1, 80)
    assert (cfg.env_id, cfg.buffer_size, cfg.tau, cfg.update_every, cfg.target, cfg.win_threshold) == (
        "LunarLander-v3", 100_000, 0.001, 4, "ddqn", 75.0)
    assert cfg.time_limit() == 12600
    other = Config.model_validate({"lr": 0.01, "batch_size": 32, "epsilon_decay": 0.9, "num_envs": 4,
                                   "env": "CartPole-v1"})
    assert (other.learning_rate, other.batch, other.decay, other.agents, other.env_id) == (
        0.01, 32, 0.9, 4, "CartPole-v1")


@pytest.mark.parametrize("config, field", [
    ({"snn_beta": 1.5}, "snn_beta"), ({"architecture": "cnn"}, "architecture"), ({"env_id": "NoSuchEnv-v0"}, "env_id"),
    ({"hidden_layers": []}, "hidden_layers"), ({"stop_learning_at_win_percent": 150}, "stop_learning_at_win_percent"),
    ({"snn_tsteps": 5}, "snn_tsteps"),  # a misspelt key is an error, not a silent default
])
def test_config_rejects_bad_values_naming_the_field(config, field):
    with pytest.raises(ValidationError) as info:
        Config.model_validate(config)
    assert field in [err["loc"][0] for err in info.value.errors()]


def test_config_rejects_a_batch_larger_than_the_buffer():
    with pytest.raises(trainers.InvalidConfig, match="batch"):
        trainers.validate_config("snn_ddqn", {"batch": 64, "buffer_size": 32})


def test_a_seed_conf_json_becomes_a_one_job_grid():
    assert snn_ddqn.is_seed_conf(SEED_CONF) and not snn_ddqn.is_seed_conf({"name": "g", "trainer": "snn_ddqn"})
    grid = snn_ddqn.grid_from_seed_conf(SEED_CONF)
    assert grid == snn_ddqn.grid_from_seed_conf(SEED_CONF)  # continue_run: the same job again
    assert grid["name"] == "SNN_DDQN" and grid["trainer"] == "snn_ddqn" and "run_tag" not in grid["config"]
    jobs = expand(GridSpec.model_validate(grid))
    assert len(jobs) == 1
    trainers.validate_config("snn_ddqn", jobs[0].config)

    t1, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    fresh = [snn_ddqn.grid_from_seed_conf(SEED_CONF, force_new_run=True, now=t) for t in (t1, t2)]
    assert fresh[0]["config"]["run_tag"] != fresh[1]["config"]["run_tag"]  # --forcenewrun: a new job each time
    assert expand(GridSpec.model_validate(fresh[0]))[0].key != jobs[0].key
    no_continue = snn_ddqn.grid_from_seed_conf({**SEED_CONF, "continue_run": False, "name": "my run/1"}, now=t1)
    assert no_continue["config"]["run_tag"] and no_continue["name"] == "my-run-1"


# ---- (g) the fused spiking forward equals snntorch's Leaky -------------------------------------------
def snntorch_steps(current: torch.Tensor, neuron, t_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: snntorch's Leaky called once per time step, as the seed's network does."""
    mem, spikes, mems = torch.zeros(current.shape[-2:]), [], []
    for t in range(t_steps):
        spike, mem = neuron(current if current.dim() == 2 else current[t], mem)
        spikes.append(spike)
        mems.append(mem)
    return torch.stack(spikes), torch.stack(mems)


@pytest.mark.parametrize("integrate", ["numpy", "torch"])  # the CPU path, and the one other devices take
@pytest.mark.parametrize("reset", ["subtract", "none"])
@pytest.mark.parametrize("constant", [True, False], ids=["constant-current", "current-per-step"])
@pytest.mark.parametrize("beta, threshold", [(0.95, 1.0), (0.6, 0.7)])
def test_a_fused_leaky_layer_equals_snntorch_bit_for_bit(monkeypatch, integrate, reset, constant, beta, threshold):
    if integrate == "torch":
        monkeypatch.setattr(lif, "_integrate_numpy", lif._integrate_torch)
    torch.manual_seed(0)
    t_steps = 12
    current = (torch.randn(32, 20) if constant else torch.randn(t_steps, 32, 20)) * 1.5
    current.requires_grad_(True)
    neuron = snn.Leaky(beta=beta, threshold=threshold, reset_mechanism=reset)
    spikes, mems = snntorch_steps(current, neuron, t_steps)
    weigh_spikes, weigh_mems = torch.randn(t_steps, 32, 20), torch.randn(t_steps, 32, 20)
    (spikes * weigh_spikes + mems * weigh_mems).sum().backward()
    expected_grad, current.grad = current.grad.clone(), None

    fused_spikes, fused_mems, total = lif.LeakyLayer.apply(current, neuron.beta.clamp(0, 1), neuron.threshold,
                                                           t_steps, reset == "subtract", True)
    assert 0.05 < spikes.mean() < 0.95  # neither silent nor saturated: the comparison means something
    assert torch.equal(fused_spikes, spikes) and torch.equal(fused_mems, mems)
    running = torch.zeros(32, 20)
    for m in mems:  # the membrane readout's sum, in the order the step-by-step loop adds
        running = running + m
    assert torch.equal(total, running)
    (fused_spikes * weigh_spikes + fused_mems * weigh_mems).sum().backward()
    torch.testing.assert_close(current.grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("readout", ["spikes", "membrane"])
@pytest.mark.parametrize("batch", [1, 40])
def test_the_fused_q_network_equals_the_snntorch_one(readout, batch):
    """Same weights, same inputs: Q equal (spike counts bit for bit), every parameter's gradient to float
    tolerance."""
    torch.manual_seed(3)
    config = {"env_id": "CartPole-v1", "hidden_layers": [32, 16], "snn_tSteps": 10, "readout": readout}
    reference = QNetwork(4, 3, Config(**config, snn_kernel="snntorch"))
    with torch.no_grad():  # stronger weights than the initial ones, so every layer spikes
        for linear in reference.linears:
            linear.weight.mul_(3.0)
    fused = QNetwork(4, 3, Config(**config, snn_kernel="fused"))
    fused.load_state_dict(reference.state_dict())  # the same state_dict keys: checkpoints load either way
    obs = torch.randn(40, 4) * 3
    with torch.no_grad():  # one agent's forward: the observation that drives the output most
        obs = obs[:batch] if batch > 1 else obs[reference(obs).sum(dim=1).argmax()].unsqueeze(0)
    q_ref, q_fused = reference(obs), fused(obs)
    assert q_ref.abs().sum() > 0
    if readout == "spikes":  # spike counts: bit for bit
        assert torch.equal(q_fused, q_ref)
    else:  # membranes: one matmul for all steps may round a last bit apart from one row at a time (a gemv)
        torch.testing.assert_close(q_fused, q_ref, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(q_ref)
    (q_ref * weights).sum().backward()
    (q_fused * weights).sum().backward()
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        scale = p_ref.grad.abs().max()
        assert scale > 0, name
        assert (p_fused.grad - p_ref.grad).abs().max() <= 1e-5 * scale, name  # float32 sums in another order


# ---- (h) the seed's nested conf.json (a copy of the real file: tests/trainers/data/seed002/SOURCE.md) ----
NESTED_CONF = json.loads((Path(__file__).parent / "data" / "seed002" / "DDQN_conf.json").read_text())


def test_the_seeds_nested_conf_json_is_accepted_and_mapped():
    cfg = trainers.parse_config("snn_ddqn", NESTED_CONF)
    assert (cfg.learning_rate, cfg.decay, cfg.batch, cfg.gamma, cfg.buffer_size, cfg.epsilon_start, cfg.epsilon_min,
            cfg.update_every, cfg.episodes, cfg.max_episode_steps) == (
        0.0004, 0.998, 100, 0.995, 100_000, 1.0, 0.1, 4, 15_000, 1000)
    assert (cfg.env_id, cfg.architecture, cfg.hidden_layers, cfg.snn_tSteps, cfg.snn_beta) == (
        "LunarLander-v3", "snn", [64, 64], 25, 0.95)
    assert (cfg.agents, cfg.stop_learning_at_win_percent, cfg.time_limit(), cfg.continue_run, cfg.debug) == (
        1, 80, 12600, False, True)
    assert cfg.stop_at_mean_return == 99999999999  # stop_condition.maxAvgPoint; maxEpisodes is above nEpisodes
    assert snn_ddqn.is_seed_conf(NESTED_CONF)
    grid = snn_ddqn.grid_from_seed_conf(NESTED_CONF, now=datetime(2026, 1, 1, tzinfo=UTC))
    assert grid["name"] == "SNN_DDQN" and grid["config"]["run_tag"]  # continue_run: false -> a new job
    jobs = expand(GridSpec.model_validate(grid))
    assert len(jobs) == 1
    trainers.validate_config("snn_ddqn", jobs[0].config)


def test_gridfleet_reads_the_nested_conf_json_file_as_a_one_job_grid():
    from cli.main import load_grid_file  # what `gridfleet run` / `gridfleet submit` read a file with

    grid = load_grid_file(Path(__file__).parent / "data" / "seed002" / "DDQN_conf.json")
    assert grid["trainer"] == "snn_ddqn" and grid["config"]["algorithm_options"] == NESTED_CONF["algorithm_options"]
    ppo = {**NESTED_CONF, "algorithm": "PPO"}  # the seed's other trainer's file: found, then refused by name
    assert snn_ddqn.is_seed_conf(ppo)
    with pytest.raises(trainers.InvalidConfig, match="config.algorithm: .*PPO"):
        trainers.validate_config("snn_ddqn", snn_ddqn.grid_from_seed_conf(ppo)["config"])


def test_the_nested_conf_json_as_a_grid_base():
    spec = GridSpec.model_validate({"name": "nested", "trainer": "snn_ddqn", "config": NESTED_CONF,
                                    "axes": {"network": ["snn", "ann"], "network_options.snn_tSteps": [10, 25],
                                             "algorithm_options.learning_rate": [0.001]}})
    parsed = [trainers.parse_config("snn_ddqn", job.config) for job in expand(spec)]
    assert sorted((c.architecture, c.snn_tSteps, c.learning_rate, c.buffer_size) for c in parsed) == [
        ("ann", 10, 0.001, 100_000), ("ann", 25, 0.001, 100_000), ("snn", 10, 0.001, 100_000),
        ("snn", 25, 0.001, 100_000)]


def test_the_seeds_stop_condition_max_episodes_caps_the_run(tmp_path):
    """The seed stops once `maxEpisodes <= episode` (0-based) after an episode: maxEpisodes + 1 episodes."""
    conf = {**NESTED_CONF, "env": "CartPole-v1", "network_options": {"hidden_layers": [8], "snn_tSteps": 3,
                                                                     "snn_beta": 0.95},
            "algorithm_options": {**NESTED_CONF["algorithm_options"], "batch": 8, "memorySize": 200,
                                  "maxNumTimeSteps": 20},
            "stop_condition": {"maxEpisodes": 2, "maxAvgPoint": 1e9}}
    h = Harness(tmp_path)
    result = h.train(**conf)
    assert result["episodes"] == 3 and [step for step, _ in h.reports] == [1, 2, 3]
    assert all(values["length"] <= 20 for _, values in h.reports)  # maxNumTimeSteps


@pytest.mark.parametrize("change, field, words", [
    ({"algorithm_options": {**NESTED_CONF["algorithm_options"], "memSize": 5}}, "config.algorithm_options.memSize",
     "Extra inputs"),
    ({"network_options": {"hidden_layers": [64], "snn_tsteps": 5}}, "config.network_options.snn_tsteps", "Extra"),
    ({"stop_condition": {"maxEpisodes": 5, "minAvgPoint": 1}}, "config.stop_condition.minAvgPoint", "Extra"),
    ({"env_options": {"render": True}}, "config.env_options.render", "Extra"),
    ({"surprise": 1}, "config.surprise", "Extra"),
    ({"algorithm": "PPO"}, "config.algorithm", "PPO"),
    ({"finished": True}, "config.finished", "marked finished"),
    ({"network": "cnn"}, "config.network", "'snn' or 'ann'"),
    ({"algorithm_options": {**NESTED_CONF["algorithm_options"], "memorySize": 0}}, "config.memorySize",
     "greater than or equal to 1"),
    ({"env_options": {"observationNormalization": True}}, "config", "env_options.observationNormalization"),
    ({"algorithm_options": [1, 2]}, "config", "algorithm_options: must be a mapping"),
    ({"stop_condition": {"maxEpisodes": "soon"}}, "config", "stop_condition.maxEpisodes"),
    ({"snn_tSteps": 10}, "config", "network_options.snn_tSteps: given twice"),
])
def test_the_nested_conf_json_rejects_what_it_cannot_map_naming_the_field(change, field, words):
    with pytest.raises(trainers.InvalidConfig) as info:
        trainers.validate_config("snn_ddqn", {**NESTED_CONF, **change})
    assert any(f == field and words in message for f, message in info.value.errors), info.value.errors


# ---- (i) the seed's habits as options: truncation, update schedule, after a win ------------------------
@pytest.mark.parametrize("truncation", ["bootstrap", "terminal"])
def test_truncated_episodes_bootstrap_unless_the_seeds_terminal_is_asked(tmp_path, truncation):
    # CartPole truncated at 6 steps: most episodes end by the time limit, a few by falling.
    h = Harness(tmp_path)
    result = h.train(**tiny(architecture="ann", agents=1, episodes=8, max_episode_steps=6, truncation=truncation))
    terminated = h.final_state()["buffer"]["terminated"]
    ends = np.cumsum([values["length"] for _, values in h.reports]) - 1
    assert len(terminated) == result["env_steps"] == ends[-1] + 1
    by_time_limit = [end for end, (_, values) in zip(ends, h.reports) if values["length"] == 6]
    assert by_time_limit, "no episode reached the time limit"
    assert terminated[by_time_limit].tolist() == [1.0 if truncation == "terminal" else 0.0] * len(by_time_limit)
    inside = np.setdiff1d(np.arange(len(terminated)), ends)
    assert not terminated[inside].any()  # only an episode's last step can be terminal


def expected_updates(lengths: list[int], every: int, batch: int, schedule: str) -> int:
    count, size = 0, 0
    for length in lengths:
        for t in range(length):
            size += 1
            if schedule == "episode":
                count += (t + 1) % every == 0 and size > batch
            else:
                count += size % every == 0 and size >= batch
    return count


@pytest.mark.parametrize("schedule", ["run", "episode"])
def test_the_update_schedule_ours_or_the_seeds(tmp_path, schedule):
    h = Harness(tmp_path)
    result = h.train(**tiny(architecture="ann", agents=1, episodes=6, update_every=3, batch=12,
                            update_schedule=schedule))
    lengths = [values["length"] for _, values in h.reports]
    assert result["updates"] == expected_updates(lengths, 3, 12, schedule) > 0
    other = "run" if schedule == "episode" else "episode"
    assert expected_updates(lengths, 3, 12, other) != result["updates"]  # the two schedules differ here


def test_after_a_win_the_seeds_evaluate_plays_on_without_learning(tmp_path):
    # Every CartPole episode returns more than 1: the win rate is 100% once the window (3) is full.
    config = tiny(architecture="ann", episodes=8, agents=1, win_by="return", win_threshold=1.0, win_window=3,
                  stop_learning_at_win_percent=99.5)
    stop = Harness(tmp_path / "stop")
    stopped = stop.train(**config)
    evaluate = Harness(tmp_path / "evaluate")
    result = evaluate.train(**config, after_win="evaluate")

    assert (stopped["stopped"], stopped["episodes"]) == ("solved", 3)
    assert (result["stopped"], result["solved"], result["solved_at_episode"], result["episodes"]) == (
        "episodes", True, 3, 8)
    assert [values["learning"] for _, values in evaluate.reports] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert [values["epsilon"] for _, values in evaluate.reports] == pytest.approx([0.7 ** i for i in range(8)])
    assert result["updates"] == stopped["updates"]  # no update after the win ...
    a, b = stop.final_state(), evaluate.final_state()
    for name, value in a["online"].items():  # ... so the evaluated net is the one that won
        assert torch.equal(value, b["online"][name]), name
    returns = [values["return"] for _, values in evaluate.reports]
    assert result["episodes_after_win"] == 5
    assert result["mean_return_after_win"] == pytest.approx(np.mean(returns[3:]))
    assert result["win_rate_after_win"] == 100.0
    assert b["buffer"]["size"] == min(result["env_steps"], 200)  # experience is still stored, as the seed does

    # Stopped inside the evaluation and resumed: the same as straight through.
    first = Harness(tmp_path / "resumed", stop_at=5)
    assert first.train(**config, after_win="evaluate") == {"stopped_at": 5}
    second = Harness(tmp_path / "resumed", checkpoint=first.checkpoints[-1])
    assert second.train(**config, after_win="evaluate")["mean_return_after_win"] == result["mean_return_after_win"]
    assert deterministic(first.reports) + deterministic(second.reports) == deterministic(evaluate.reports)


def test_the_mean_return_criterion_ends_the_run_even_with_evaluate(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**tiny(architecture="ann", episodes=8, agents=1, win_window=3, stop_learning_at_win_percent=None,
                            stop_at_mean_return=1.0, after_win="evaluate"))
    assert (result["stopped"], result["episodes"], result["solved_at_episode"]) == ("solved", 3, 3)
    assert "episodes_after_win" not in result


def test_the_example_grid_is_the_nested_conf_json_swept():
    import yaml

    root = Path(__file__).parents[2]
    spec = GridSpec.model_validate(yaml.safe_load((root / "examples" / "seed002_grid.yaml").read_text()))
    parsed = [trainers.parse_config("snn_ddqn", job.config) for job in expand(spec)]
    assert len(parsed) == 10
    assert sorted((c.architecture, c.snn_tSteps, c.snn_beta, c.target) for c in parsed if c.architecture == "ann") == [
        ("ann", 25, 0.95, "ddqn"), ("ann", 25, 0.95, "dqn")]
    assert {(c.snn_tSteps, c.snn_beta) for c in parsed} == {(10, 0.9), (10, 0.95), (25, 0.9), (25, 0.95)}
    seed_base = {k: v for k, v in spec.config.items() if k in NESTED_CONF}
    assert seed_base == NESTED_CONF  # the base is the seed's file as written, plus gridfleet's options
    assert all((c.truncation, c.update_schedule, c.after_win, c.buffer_size) == ("terminal", "episode", "evaluate",
                                                                                100_000) for c in parsed)
