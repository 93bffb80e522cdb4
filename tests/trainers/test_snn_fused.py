"""snn_ddqn's fused training (worker/trainers/snn_fused.py): K agents' nets as one batched network, each
member equal to its solo run: the same episodes (returns, lengths), losses and final weights.

Real CartPole-v1 envs, short episodes, epsilon starting at 0.5 so greedy actions (the batched network)
decide half the steps; real TrainerContexts, Pipes and LocalStores."""
from __future__ import annotations

import fused_harness  # tests/trainers/fused_harness.py
import harness  # tests/trainers/harness.py
import numpy as np
import pytest
import torch

from worker import trainers
from worker.trainers import snn_ddqn
from worker.trainers.snn_ddqn import Config

SEEDS = [3, 4, 5]
# Each member its own lr, gamma, tau, target rule and exploration: all per member under one fuse key.
MEMBERS = [{"learning_rate": 0.01}, {"learning_rate": 0.003, "gamma": 0.9, "target": "dqn"},
           {"learning_rate": 0.02, "tau": 0.05, "epsilon_start": 0.3, "update_every": 3}]


def tiny(**overrides) -> Config:
    config = {"env_id": "CartPole-v1", "episodes": 6, "max_episode_steps": 25, "agents": 2, "hidden_layers": [16],
              "snn_tSteps": 4, "batch": 8, "buffer_size": 200, "update_every": 2, "decay": 0.8,
              "epsilon_start": 0.5, "learning_rate": 0.01, "checkpoint_every": 2}
    return Config.model_validate({**config, **overrides})


def members(**common) -> list[Config]:
    return [tiny(**common, **m) for m in MEMBERS]


Gang = fused_harness.Gang.for_trainer("snn_ddqn")
Solo = fused_harness.Solo.for_trainer(snn_ddqn.train)
solo_runs = Solo.runs


def episodes(h: harness.Harness) -> list[tuple]:
    """What each finished episode was: its number, return, length, epsilon and the run's env steps. These
    must be equal: one other greedy action and the runs part."""
    return [(step, v["return"], v["length"], v["epsilon"], v["env_steps"]) for step, v in h.reports]


def losses(h: harness.Harness) -> list:
    return [v["loss"] for _, v in h.reports]


def assert_same_losses(expected: list, got: list) -> None:
    """Equal to float tolerance (a NaN, before the first update, is reported as None): a batched matmul may
    round a last bit differently from the solo one at some small shapes."""
    assert [v is None for v in expected] == [v is None for v in got]
    assert [v for v in expected if v is not None] == pytest.approx([v for v in got if v is not None], rel=1e-5)


def plain(value):
    """NaN as None (NaN != NaN), in nested dicts and lists: a loss before the first update is NaN."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def assert_same_state(a: dict, b: dict) -> None:
    exact = lambda run: plain({k: v for k, v in run.items() if k not in ("elapsed", "loss_sum")}  # noqa: E731
                              | {"history": {k: v for k, v in run["history"].items() if k != "loss"}})
    assert a["step"] == b["step"] and exact(a["run"]) == exact(b["run"]) and a["lanes"] == b["lanes"]
    assert_same_losses(plain(a["run"]["history"]["loss"]), plain(b["run"]["history"]["loss"]))
    assert a["run"]["loss_sum"] == pytest.approx(b["run"]["loss_sum"], rel=1e-5)
    for net in ("online", "target"):
        assert a[net].keys() == b[net].keys()
        for name in a[net]:
            assert torch.allclose(a[net][name], b[net][name], rtol=1e-5, atol=1e-7), (net, name)
    for index, entry in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        assert float(entry["step"]) == float(other["step"])
        assert torch.allclose(entry["exp_avg"], other["exp_avg"], rtol=1e-5, atol=1e-8)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key in ("obs", "actions", "rewards", "terminated"):
        assert np.array_equal(a["buffer"][key], b["buffer"][key]), key
    assert a["rng"] == b["rng"] and torch.equal(a["torch_rng"], b["torch_rng"])


def assert_same_run(solo, fused, solo_result, fused_result):
    assert episodes(solo) == episodes(fused)
    assert_same_losses(losses(solo), losses(fused))
    for key in ("episodes", "env_steps", "updates", "stopped", "mean_return", "return_curve", "parameters", "epsilon"):
        assert solo_result[key] == fused_result[key], key
    assert_same_state(solo.store.load(solo.checkpoints[-1]), fused.store.load(fused.checkpoints[-1]))


@pytest.mark.parametrize("architecture, readout", [("snn", "spikes"), ("snn", "membrane"), ("ann", "spikes")])
def test_three_agents_in_one_batched_network_equal_their_solo_runs(tmp_path, architecture, readout):
    cfgs = members(architecture=architecture, readout=readout)
    gang = Gang(tmp_path / "gang", SEEDS)
    results = gang.train(cfgs)
    assert all(r["fused"] for r in results), results
    runs = solo_runs(tmp_path, cfgs, SEEDS)
    for (solo, solo_result), fused, result in zip(runs, gang.members, results):
        assert solo_result["updates"] > 10
        assert_same_run(solo, fused, solo_result, result)
    # the members are different agents: their own seeds, envs, weights
    finals = [h.store.load(h.checkpoints[-1])["online"]["linears.0.weight"] for h in gang.members]
    assert not torch.equal(finals[0], finals[1])
    assert len({tuple(r["return"] for _, r in h.reports) for h in gang.members}) == 3


def test_a_failing_member_and_a_stopped_member_leave_while_the_other_goes_on(tmp_path):
    cfgs = members()
    gang = Gang(tmp_path / "gang", SEEDS, stop_at=[None, 2, None])
    fused_harness.fail_reports(gang.members[0], from_step=3)
    results = gang.train(cfgs)
    assert isinstance(results[0], ConnectionError), results[0]
    assert set(results[1]) == {"stopped_at"} and results[1]["stopped_at"] >= 2  # 3 when two lanes ended at once
    stopped_at = results[1]["stopped_at"]
    assert gang.members[1].checkpoints[-1]["step"] == stopped_at
    runs = solo_runs(tmp_path, cfgs, SEEDS)
    assert_same_run(runs[2][0], gang.members[2], runs[2][1], results[2])
    for i, last in ((0, 2), (1, stopped_at)):  # what they did before leaving is the solo run's beginning
        assert episodes(gang.members[i]) == [e for e in episodes(runs[i][0]) if e[0] <= last]
        assert_same_losses([v["loss"] for step, v in runs[i][0].reports if step <= last], losses(gang.members[i]))


def test_members_resume_solo_or_in_a_gang_from_their_own_episodes_and_finish_as_uninterrupted_runs(tmp_path):
    cfgs = members()
    gang = Gang(tmp_path / "gang", SEEDS[:2], stop_at=[2, 3])  # stopped mid-episode, at different episodes
    stops = gang.train(cfgs[:2])
    assert [s["stopped_at"] for s in stops] == [h.checkpoints[-1]["step"] for h in gang.members]
    first = Solo(tmp_path / "gang" / "m2", seed=SEEDS[2], job_id=12, stop_at=2)  # a solo checkpoint
    assert "stopped_at" in first.run(cfgs[2])
    pointers = [h.checkpoints[-1] for h in gang.members] + [first.checkpoints[-1]]
    in_flight = [h.store.load(h.checkpoints[-1])["lanes"] for h in gang.members]
    assert all(any(lane is not None for lane in lanes) for lanes in in_flight)  # stopped mid-episode: replayed
    alone = Solo(tmp_path / "gang" / "m0", seed=SEEDS[0], job_id=10, checkpoint=pointers[0])
    alone_result = alone.run(cfgs[0])
    again = Gang(tmp_path / "gang", SEEDS[1:], checkpoints=pointers[1:], names=["m1", "m2"])
    resumed = again.train(cfgs[1:])
    straight = solo_runs(tmp_path, cfgs, SEEDS)
    for i, (h, result) in enumerate([(alone, alone_result), *zip(again.members, resumed)]):
        solo, solo_result = straight[i]
        since = pointers[i]["step"]
        assert episodes(h) == [e for e in episodes(solo) if e[0] > since], i
        assert_same_losses([v["loss"] for step, v in solo.reports if step > since], losses(h))
        for key in ("episodes", "env_steps", "updates", "mean_return", "return_curve"):
            assert solo_result[key] == result[key], (i, key)
        assert_same_state(solo.store.load(solo.checkpoints[-1]), h.store.load(h.checkpoints[-1]))


def test_fuse_key_is_the_network_and_batch_and_lets_learning_settings_differ():
    base = tiny()
    for same in ({"learning_rate": 0.1}, {"gamma": 0.9}, {"tau": 0.1}, {"decay": 0.5}, {"episodes": 9},
                 {"buffer_size": 50}, {"target": "dqn"}, {"update_every": 7}):
        assert snn_ddqn.fuse_key(tiny(**same)) == snn_ddqn.fuse_key(base), same
    for change in ({"hidden_layers": [8]}, {"snn_tSteps": 5}, {"readout": "membrane"}, {"architecture": "ann"},
                   {"batch": 16}, {"agents": 1}, {"env_id": "LunarLander-v3"}, {"snn_beta": 0.9}):
        assert snn_ddqn.fuse_key(tiny(**change)) != snn_ddqn.fuse_key(base), change
    assert snn_ddqn.fuse_key(tiny(snn_kernel="snntorch")) is None
    long = tiny(hidden_layers=[8000 + i for i in range(16)], env_id="gymnasium.envs.classic_control:" + "C" * 120)
    assert len(snn_ddqn.fuse_key(long)) <= 200  # what jobs.fuse_key holds
    assert snn_ddqn.fuse_key(long) != snn_ddqn.fuse_key(long.model_copy(update={"hidden_layers": [8000] * 16}))
    assert trainers.fuse_key("snn_ddqn", {"env_id": "CartPole-v1", "lr": 0.5}) == trainers.fuse_key(
        "snn_ddqn", {"env_id": "CartPole-v1"})


def test_train_many_refuses_configs_of_different_fuse_keys(tmp_path):
    with pytest.raises(ValueError, match="different fuse keys"):
        Gang(tmp_path, [0, 1]).train([tiny(), tiny(hidden_layers=[8])])
    with pytest.raises(ValueError, match="not fused"):
        Gang(tmp_path / "b", [0]).train([tiny(snn_kernel="snntorch")])


def test_a_member_whose_checkpoint_cannot_be_read_fails_alone(tmp_path):
    assert_same_run(*fused_harness.unreadable_first(Gang, Solo, tmp_path, members()[:2], SEEDS, step=2))
