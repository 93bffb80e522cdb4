"""Minari behaviour-cloning data and reward scoring (seed 000) on small datasets recorded on the spot
from the real Gymnasium Robotics envs, saved under the real ids in a temporary Minari directory."""
from __future__ import annotations

import os
import time

import minari
import numpy as np
import pytest
import torch

from worker.trainers.iterativenn import minari_data
from worker.trainers.iterativenn.minari_data import (
    MinariDataMissing,
    features,
    load_sequences,
    make_env,
    parse_dataset_id,
    write_random_dataset,
)
from worker.trainers.iterativenn.scoring import score_policy

EPISODES, STEPS = 8, 12
# id -> (input size, action size): Adroit door 39/28, hammer 46/26; kitchen-mixed 59 + 2 x 12 goal entries.
DATASETS = {
    "D4RL/door/expert-v2": (39, 28),
    "D4RL/hammer/expert-v2": (46, 26),
    "D4RL/kitchen/mixed-v2": (83, 9),
}


COMPLETE = "D4RL/kitchen/complete-v2"  # seed 000's kitchencomplete: 19 episodes, split 15 / 4, test = validation


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    for dataset_id in DATASETS:
        write_random_dataset(dataset_id, root, episodes=EPISODES, steps=STEPS, seed=3)
    write_random_dataset(COMPLETE, root, episodes=19, steps=3, seed=4)
    return root


def stored(root, dataset_id):
    return minari.MinariDataset(root / dataset_id / "data")


def test_dataset_ids_name_their_family_env_and_average():
    assert parse_dataset_id("D4RL/door/expert-v2") == ("door", "expert")
    assert parse_dataset_id("door-expert-v1") == ("door", "expert")
    assert parse_dataset_id("kitchen-mixed-v1") == ("kitchen", "mixed")
    assert parse_dataset_id("D4RL/kitchen/complete-v2") == ("kitchen", "complete")
    assert minari_data.env_info("D4RL/hammer/cloned-v2").env_id == "AdroitHandHammer-v1"
    assert minari_data.env_info("D4RL/door/expert-v2").max_episode_steps == 200
    assert minari_data.env_info("D4RL/kitchen/mixed-v2").kwargs["tasks_to_complete"] == [
        "microwave", "kettle", "bottom burner", "light switch"]
    assert minari_data.known_average_return("D4RL/kitchen/partial-v2") == 290.86
    assert minari_data.known_average_return("D4RL/door/cloned-v2") is None
    with pytest.raises(ValueError, match="pen"):
        parse_dataset_id("D4RL/pen/expert-v2")
    with pytest.raises(ValueError, match="kitchen variant"):
        minari_data.env_info("D4RL/kitchen/bogus-v2")


def test_kitchen_features_follow_the_seeds_task_order():
    # seed 000's DataFactoryFK: bottom burner, kettle, light switch, microwave (FKC: kettle, light switch,
    # microwave, slide cabinet): the task names in sorted order, achieved goals first, then desired
    goal = {"slide cabinet": [6.0], "bottom burner": [7.0, 7.5], "kettle": [1.0] * 7,
            "microwave": [5.0], "light switch": [2.0, 3.0]}
    obs = {"observation": np.arange(3.0), "achieved_goal": goal,
           "desired_goal": {k: [-v for v in vals] for k, vals in goal.items()}}
    x = features(obs)
    order = [7.0, 7.5] + [1.0] * 7 + [2.0, 3.0, 5.0, 6.0]
    assert x.dtype == np.float32
    assert x.tolist() == [0.0, 1.0, 2.0] + order + [-v for v in order]
    # DataFactoryFKB: the desired goals only
    assert features(obs, "desired").tolist() == [0.0, 1.0, 2.0] + [-v for v in order]
    mixed = {"observation": np.zeros(2), "achieved_goal": {k: goal[k] for k in ("microwave", "kettle")},
             "desired_goal": {k: goal[k] for k in ("microwave", "kettle")}}
    assert features(mixed).tolist() == [0.0, 0.0] + [1.0] * 7 + [5.0] + [1.0] * 7 + [5.0]
    # a whole episode (leading time axis) flattens the same way, step by step
    episode = {"observation": np.stack([obs["observation"]] * 4),
               "achieved_goal": {k: np.stack([v] * 4) for k, v in obs["achieved_goal"].items()},
               "desired_goal": {k: np.stack([v] * 4) for k, v in obs["desired_goal"].items()}}
    assert features(episode).shape == (4, x.shape[0]) and (features(episode) == x).all()


@pytest.mark.parametrize("dataset_id", list(DATASETS))
def test_episodes_become_observation_action_sequences(minari_root, dataset_id):
    data = load_sequences(dataset_id, train_size=4, validation_size=2, test_size=2, seed=0, minari_root=minari_root)
    n_in, n_out = DATASETS[dataset_id]
    assert (data.input_size, data.output_size, data.loss, data.sequence_position) == (n_in, n_out, "mse", "all")
    assert [len(s) for s in (data.train, data.validation, data.test)] == [4, 2, 2]
    assert data.name == dataset_id and data.info["env_id"] == minari_data.env_info(dataset_id).env_id
    assert data.info["dataset_average_return"] == minari_data.known_average_return(dataset_id)

    # Every stored episode lands in exactly one split, as x = observations[:-1], y = its actions.
    episodes = list(stored(minari_root, dataset_id).iterate_episodes())
    pairs = data.train + data.validation + data.test
    for episode in episodes:
        matches = [(x, y) for x, y in pairs if y.shape[0] == len(episode.actions)
                   and torch.equal(y, torch.from_numpy(np.asarray(episode.actions, dtype=np.float32)))]
        assert len(matches) == 1, f"episode {episode.id} in {len(matches)} splits"
        x, y = matches[0]
        assert x.dtype == y.dtype == torch.float32
        assert x.shape == (STEPS, n_in) and y.shape == (STEPS, n_out)
        assert torch.equal(x, torch.from_numpy(features(episode.observations)[:-1]))


def test_split_is_fixed_by_the_seed(minari_root):
    def split(seed):
        data = load_sequences("D4RL/door/expert-v2", 5, 2, 1, seed=seed, minari_root=minari_root)
        return [[y[0, 0].item() for _, y in part] for part in (data.train, data.validation, data.test)]

    assert split(1) == split(1)
    assert split(1) != split(2)


def test_sizes_larger_than_the_dataset_are_refused(minari_root):
    with pytest.raises(ValueError, match=f"has {EPISODES} episodes"):
        load_sequences("D4RL/door/expert-v2", EPISODES, 1, 0, seed=0, minari_root=minari_root)


def test_a_missing_dataset_fails_fast_naming_the_id_and_the_directory(tmp_path):
    started = time.monotonic()
    with pytest.raises(MinariDataMissing) as missing:
        load_sequences("D4RL/door/expert-v2", 4, 2, 2, seed=0, minari_root=tmp_path)
    assert time.monotonic() - started < 2
    assert "D4RL/door/expert-v2" in str(missing.value) and str(tmp_path) in str(missing.value)


def test_download_goes_to_the_given_directory_and_failures_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", "/nonexistent/elsewhere")
    seen = []

    def offline(dataset_id):
        seen.append(os.environ["MINARI_DATASETS_PATH"])
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(minari, "download_dataset", offline)
    with pytest.raises(MinariDataMissing, match="downloading it failed: ConnectionError"):
        load_sequences("D4RL/hammer/expert-v2", 1, 0, 0, seed=0, minari_root=tmp_path, download=True)
    assert seen == [str(tmp_path)]
    assert os.environ["MINARI_DATASETS_PATH"] == "/nonexistent/elsewhere"  # put back

    def from_the_env(dataset_id):  # a "download" that writes where Minari is told to
        write_random_dataset(dataset_id, os.environ["MINARI_DATASETS_PATH"], episodes=2, steps=5)

    monkeypatch.setattr(minari, "download_dataset", from_the_env)
    data = load_sequences("D4RL/hammer/expert-v2", 1, 1, 0, seed=0, minari_root=tmp_path, download=True)
    assert data.input_size == 46 and (tmp_path / "D4RL/hammer/expert-v2/data").is_dir()


def test_scoring_rolls_the_policy_out_in_the_real_env(minari_root):
    dataset_id, steps, episodes = "D4RL/door/expert-v2", 8, 2
    histories = []

    def policy(history):
        histories.append(history.clone())
        t = history.shape[0]  # depends on the whole history, so a wrong history changes the return
        return np.sin(np.arange(28) * 0.3 + t) * np.tanh(history.sum().item())

    score = score_policy(policy, dataset_id, episodes=episodes, seed=11, max_episode_steps=steps)

    # The same actions replayed by hand in a fresh env give the same returns and observations.
    env = make_env(dataset_id, max_episode_steps=steps)
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=11 + episode)
        seen, total = [features(obs)], 0.0
        for t in range(steps):
            history = histories[episode * steps + t]
            assert history.shape == (t + 1, 39) and history.dtype == torch.float32
            assert np.array_equal(history.numpy(), np.stack(seen))
            action = np.clip(np.sin(np.arange(28) * 0.3 + t + 1) * np.tanh(history.sum().item()), -1, 1)
            obs, reward, *_ = env.step(action)
            seen.append(features(obs))
            total += reward
        returns.append(total)
    env.close()
    assert len(histories) == episodes * steps
    assert score["average_return"] == pytest.approx(np.mean(returns), rel=1e-9)
    assert score["return_std"] == pytest.approx(np.std(returns), rel=1e-9)
    assert score["episodes"] == episodes and score["average_length"] == steps
    assert score["dataset_average_return"] == 2923.66
    assert score["return_ratio"] == pytest.approx(np.mean(returns) / 2923.66)


def test_scoring_kitchen_and_a_diverged_policy():
    score = score_policy(lambda history: np.full(9, np.nan), "D4RL/kitchen/mixed-v2", episodes=1, seed=0,
                         max_episode_steps=4, dataset_average_return=100.0)
    assert score["nonfinite_actions"] == 4 and score["average_length"] == 4
    assert score["dataset_average_return"] == 100.0 and np.isfinite(score["average_return"])
    unknown = score_policy(lambda history: np.zeros(26), "D4RL/hammer/cloned-v2", episodes=1, seed=0,
                           max_episode_steps=3)
    assert "return_ratio" not in unknown and unknown["nonfinite_actions"] == 0


def test_sizes_left_out_are_the_seeds_when_they_fit_else_a_tenth():
    sizes = minari_data.split_sizes
    assert sizes("D4RL/door/expert-v2", 5000, None, None, None) == (4500, 250, 250)
    assert sizes("D4RL/kitchen/mixed-v2", 621, None, None, None) == (501, 60, 60)
    assert sizes("D4RL/kitchen/complete-v2", 19, None, None, None) == (15, 4, 0)  # DataFactoryFKC's split
    assert sizes("D4RL/kitchen/complete-v2", 10, None, None, None) == (8, 1, 1)
    assert sizes("D4RL/hammer/cloned-v2", 3606, None, 20, None) == (3226, 20, 360)
    assert sizes("D4RL/door/expert-v2", 5000, 10, None, 0) == (10, 250, 0)


# ---- the sparse_rnn trainer on these datasets ------------------------------------------------------------
MODEL_TYPES = ["description", "lstm", "gru", "rnn", "mlp"]


def sparse_rnn_config(root, dataset_id, model_type, **data):
    return {"model_type": model_type, "hidden_size": 32, "learning_rate": 1e-2, "max_steps": 30, "max_epochs": 30,
            "log_every": 5, "use_cuda": False,
            "data": {"dataset": dataset_id, "train_size": 6, "validation_size": 1, "test_size": 1,
                     "batch_size": 6, "minari_root": str(root), **data}}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only cost
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dataset_id", list(DATASETS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_each_model_type_learns_each_minari_dataset(minari_root, tmp_path, one_thread, dataset_id, model_type):
    import harness  # tests/trainers/harness.py
    from worker.trainers import sparse_rnn

    run = harness.Harness(tmp_path)
    result = run.train(sparse_rnn, sparse_rnn_config(minari_root, dataset_id, model_type))
    losses = [values["loss"] for _step, values in run.reports if "loss" in values]
    assert len(losses) == 6 and all(np.isfinite(losses))
    # Full-batch steps on 6 episodes: the training loss must fall clearly, not just wobble.
    assert losses[-1] < 0.98 * losses[0], losses
    assert result["dataset"] == dataset_id and result["steps"] == 30 and np.isfinite(result["test_loss"])


def test_the_trainer_scores_its_policy_in_the_env(minari_root, tmp_path, one_thread):
    import harness
    from worker.trainers import sparse_rnn

    config = sparse_rnn_config(minari_root, "D4RL/door/expert-v2", "lstm", score_episodes=1)
    config.update(max_steps=2, max_epochs=2)
    result = harness.Harness(tmp_path).train(sparse_rnn, config)
    assert result["episodes"] == 1 and result["average_length"] == 200  # the dataset's own episode limit
    assert np.isfinite(result["average_return"]) and result["nonfinite_actions"] == 0
    assert result["return_ratio"] == pytest.approx(result["average_return"] / 2923.66)


# ---- seed 000's own data files, on datasets recorded on the spot ------------------------------------------
SEED_DATA = {  # their conf/data file -> (the Minari dataset its DataFactory loaded, x size)
    "adroit_door": ("D4RL/door/expert-v2", 39), "adroit_hammer": ("D4RL/hammer/expert-v2", 46),
    "kitchen": ("D4RL/kitchen/mixed-v2", 83), "kitchencomplete": (COMPLETE, 81),
}


@pytest.mark.parametrize("stem", list(SEED_DATA))
def test_the_seeds_data_files_name_datasets_that_load(minari_root, tmp_path, stem):
    import yaml

    from worker.trainers import sparse_rnn

    seed_file = {  # as in their conf/data (kitchencomplete.yaml says franka_kitchen too)
        "adroit_door": {"dataset": "adroit_door", "name": "adroit_door"},
        "adroit_hammer": {"dataset": "adroit_hammer", "name": "adroit_hammer"},
        "kitchen": {"dataset": "franka_kitchen", "name": "franka_kitchen"},
        "kitchencomplete": {"dataset": "franka_kitchen", "name": "franka_kitchen", "train_size": 15,
                            "validation_size": 4, "test_size": 4},
    }[stem]
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(seed_file))
    config = sparse_rnn.config_from_hydra({}, path, {})
    config["data"].update(minari_root=str(minari_root))
    if stem != "kitchencomplete":
        config["data"].update(train_size=4, validation_size=2, test_size=2)
    cfg = sparse_rnn.Config.model_validate(config)
    want, x_size = SEED_DATA[stem]
    assert cfg.data.dataset == want
    data = sparse_rnn.load_data(cfg, seed=0)
    assert data.name == want and data.input_size == x_size
    if stem == "kitchencomplete":  # DataFactoryFKC: random_split [15, 4, 0], then test = validation
        assert (len(data.train), len(data.validation)) == (15, 4) and data.test is data.validation
    assert sparse_rnn.shuffles(cfg)  # the Minari factories shuffled their training loaders


def test_kitchen_desired_goals_only_as_the_seeds_fkb(minari_root):
    both = load_sequences("D4RL/kitchen/mixed-v2", 4, 2, 2, seed=0, minari_root=minari_root)
    desired = load_sequences("D4RL/kitchen/mixed-v2", 4, 2, 2, seed=0, minari_root=minari_root,
                             kitchen_goals="desired")
    assert (both.input_size, desired.input_size) == (83, 71)
    assert torch.equal(both.train[0][0][:, :59], desired.train[0][0][:, :59])
    assert torch.equal(both.train[0][0][:, 71:], desired.train[0][0][:, 59:])  # the desired goals, same order
