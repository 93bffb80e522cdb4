"""Minari behaviour-cloning data for sparse_rnn (seed 000): one episode = one sequence.

    data = load_sequences("D4RL/door/expert-v2", train_size=4500, validation_size=250, test_size=250, seed=0)

- x = the episode's observations[:-1] (Minari stores T + 1 observations for T actions), y = the actions,
  float32, MSE loss at every step. Kitchen observations are dicts; `features` flattens them as seed 000's
  DataFactoryFK/FKC did: observation, then the achieved goals, then the desired goals, each in the order
  of the task names (bottom burner, kettle, light switch, microwave, slide cabinet: the dataset's own
  tasks, sorted); `kitchen_goals="desired"` leaves the achieved goals out (DataFactoryFKB). The same for
  the stored dataset and for the live env when scoring.
- Episodes are split train/validation/test by one permutation drawn from `seed`, so the same seed gives
  the same split on every machine; only the chosen episodes are read. Sizes count episodes; one left
  as None is seed 000's (Adroit 4500/250/250, kitchen 501/60/60, kitchen-complete 15/4/0 with the
  validation episodes reused as test) when those fit, else a tenth each for
  validation and test and the rest for training.
- Datasets are read from `minari_root/<dataset_id>/data`. The default root is Minari's own
  (`MINARI_DATASETS_PATH`, else ~/.minari/datasets). A missing dataset is downloaded only with
  `download=True`; otherwise, or when the download fails (no network), the error names the dataset id
  and the directory searched. Remote ids fail at once offline without download, after ~23 s with it.
- `make_env` builds the Gymnasium Robotics env a dataset family was recorded in (the D4RL datasets'
  own env kwargs), used for reward scoring and for `write_random_dataset` (small local datasets from the
  real envs, for tests and smoke runs; no jax needed).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .data import SequenceData

# What seed 000 reports next to a policy's return: the D4RL datasets' own average episode returns.
# Keyed by (family, variant) so every version of an id (door-expert-v1, D4RL/door/expert-v2) finds it.
DATASET_AVERAGE_RETURNS: dict[tuple[str, str], float] = {
    ("door", "expert"): 2923.66,
    ("hammer", "expert"): 12388.35,
    ("kitchen", "mixed"): 342.77,
    ("kitchen", "partial"): 290.86,
    ("kitchen", "complete"): 377.84,
}


@dataclass(frozen=True)
class EnvInfo:
    """The env a dataset family was recorded in, as the D4RL Minari datasets' env specs give it."""

    env_id: str
    max_episode_steps: int
    kwargs: dict[str, Any] = field(default_factory=dict)


ENV_FAMILIES = ("door", "hammer", "kitchen")
_KITCHEN_KWARGS = {"remove_task_when_completed": False, "terminate_on_tasks_completed": False}
_KITCHEN_TASKS_4 = ["microwave", "kettle", "light switch", "slide cabinet"]
_ENVS: dict[tuple[str, str | None], EnvInfo] = {
    ("door", None): EnvInfo("AdroitHandDoor-v1", 200),
    ("hammer", None): EnvInfo("AdroitHandHammer-v1", 200),
    ("kitchen", "mixed"): EnvInfo("FrankaKitchen-v1", 450, {
        **_KITCHEN_KWARGS, "tasks_to_complete": ["microwave", "kettle", "bottom burner", "light switch"]}),
    ("kitchen", "partial"): EnvInfo("FrankaKitchen-v1", 450, {**_KITCHEN_KWARGS, "tasks_to_complete": _KITCHEN_TASKS_4}),
    ("kitchen", "complete"): EnvInfo("FrankaKitchen-v1", 280, {**_KITCHEN_KWARGS, "tasks_to_complete": _KITCHEN_TASKS_4}),
}
# Seed 000's train/validation/test episode counts (its conf/data files), used when a size is left out.
SEED_SIZES = {"door": (4500, 250, 250), "hammer": (4500, 250, 250), "kitchen": (501, 60, 60),
              ("kitchen", "complete"): (15, 4, 0)}  # DataFactoryFKC: its 19 episodes, test = validation
KITCHEN_GOALS = {"achieved_desired": ("achieved_goal", "desired_goal"), "desired": ("desired_goal",)}


class MinariDataMissing(FileNotFoundError):
    """The dataset is not in the local Minari directory and could not (or may not) be downloaded."""


def parse_dataset_id(dataset_id: str) -> tuple[str, str]:
    """(family, variant) of a Minari id: "D4RL/door/expert-v2" and "door-expert-v1" -> ("door", "expert")."""
    path = dataset_id.rsplit("-v", 1)[0] if dataset_id.rsplit("-v", 1)[-1].isdigit() else dataset_id
    parts = path.split("/")
    if len(parts) >= 2:
        family, variant = parts[-2], parts[-1]
    else:
        family, _, variant = parts[0].partition("-")
    if family not in ENV_FAMILIES:
        raise ValueError(f"unknown Minari dataset family {family!r} in {dataset_id!r}; known: "
                         f"{', '.join(ENV_FAMILIES)} (e.g. D4RL/door/expert-v2, D4RL/kitchen/mixed-v2)")
    return family, variant


def env_info(dataset_id: str) -> EnvInfo:
    family, variant = parse_dataset_id(dataset_id)
    info = _ENVS.get((family, variant)) or _ENVS.get((family, None))
    if info is None:
        known = ", ".join(v for f, v in _ENVS if f == family and v)
        raise ValueError(f"unknown {family} variant {variant!r} in {dataset_id!r}; known: {known}")
    return info


def make_env(dataset_id: str, max_episode_steps: int | None = None):
    """The dataset's Gymnasium Robotics env, with its own episode limit unless one is given. Never
    renders (no window, no display needed). Gymnasium's env checker is off: these envs are known, and
    it only warns (kitchen reuses its observation dict; `features` copies it anyway)."""
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    info = env_info(dataset_id)
    steps = info.max_episode_steps if max_episode_steps is None else max_episode_steps
    return gym.make(info.env_id, max_episode_steps=steps, render_mode=None, disable_env_checker=True,
                    **info.kwargs)


def known_average_return(dataset_id: str) -> float | None:
    """The dataset's published average return, or None for datasets seed 000 gives none for."""
    return DATASET_AVERAGE_RETURNS.get(parse_dataset_id(dataset_id))


def features(observations: Any, kitchen_goals: str = "achieved_desired") -> np.ndarray:
    """Flatten observations to float32 [..., n]: arrays as they are; kitchen dicts as observation, then
    achieved goals, then desired goals, tasks sorted by name as seed 000's data factories listed them
    ("desired": the desired goals only). Works on one env observation and on a whole stored episode alike."""
    if not isinstance(observations, dict):
        return np.asarray(observations, dtype=np.float32)
    if kitchen_goals not in KITCHEN_GOALS:
        raise ValueError(f"kitchen_goals must be one of {', '.join(KITCHEN_GOALS)}, got {kitchen_goals!r}")
    keys = sorted(observations["desired_goal"])
    parts = [observations["observation"]] + [observations[g][k] for g in KITCHEN_GOALS[kitchen_goals] for k in keys]
    return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], axis=-1)


def default_root() -> Path:
    """Minari's own datasets directory (it reads MINARI_DATASETS_PATH itself)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


@contextlib.contextmanager
def _minari_root(root: Path) -> Iterator[None]:
    # Minari's download and create functions take no directory: they read MINARI_DATASETS_PATH each call.
    # Point it at `root` for the call only, and put back what was there.
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def open_dataset(dataset_id: str, minari_root: str | Path | None = None, download: bool = False):
    """The MinariDataset `dataset_id` under `minari_root`, downloading it there only when allowed."""
    import minari

    root = Path(minari_root) if minari_root is not None else default_root()
    data_path = root / dataset_id / "data"
    if not data_path.is_dir():
        if not download:
            raise MinariDataMissing(
                f"Minari dataset {dataset_id!r} is not in the local Minari directory {root} "
                f"(looked for {data_path}). Download it there once with `MINARI_DATASETS_PATH={root} "
                f"minari download {dataset_id}`, or allow downloading (download=True).")
        try:
            with _minari_root(root):
                minari.download_dataset(dataset_id)
        except Exception as exc:  # network, unknown id, incompatible version: all say the same to the user
            raise MinariDataMissing(
                f"Minari dataset {dataset_id!r} is not in {root} and downloading it failed: "
                f"{type(exc).__name__}: {exc}") from exc
        if not data_path.is_dir():
            raise MinariDataMissing(f"downloading Minari dataset {dataset_id!r} left nothing at {data_path}")
    return minari.MinariDataset(data_path)


def split_sizes(dataset_id: str, total: int, train: int | None, validation: int | None,
                test: int | None) -> tuple[int, int, int]:
    """Fill in sizes left as None: seed 000's (Adroit 4500/250/250, kitchen 501/60/60) when they fit the
    dataset, else a tenth of its episodes (at least 1) each for validation and test and the rest for
    training. Sizes that are given are kept as they are (too large: `_split` refuses them)."""
    family, variant = parse_dataset_id(dataset_id)
    defaults = SEED_SIZES.get((family, variant)) or SEED_SIZES[family]
    fits = sum(defaults) <= total
    tenth = max(1, total // 10)
    validation = validation if validation is not None else defaults[1] if fits else tenth
    test = test if test is not None else defaults[2] if fits else tenth
    train = train if train is not None else defaults[0] if fits else max(1, total - validation - test)
    return train, validation, test


def _split(total: int, sizes: tuple[int, int, int], seed: int, dataset_id: str) -> list[np.ndarray]:
    if min(sizes) < 0 or sizes[0] < 1:
        raise ValueError(f"train_size must be >= 1 and the other sizes >= 0, got {sizes}")
    if sum(sizes) > total:
        raise ValueError(f"{dataset_id} has {total} episodes; train/validation/test sizes {sizes} "
                         f"need {sum(sizes)}")
    order = np.random.default_rng(seed).permutation(total)
    bounds = np.cumsum((0,) + sizes)
    return [order[bounds[i]:bounds[i + 1]] for i in range(3)]


def _pairs(dataset, indices: np.ndarray, kitchen_goals: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if len(indices) == 0:
        return []
    # iterate_episodes takes ids from the dataset's own episode list; read them in file order.
    ids = dataset.episode_indices[np.sort(indices)]
    by_id = {}
    for episode in dataset.iterate_episodes(ids.tolist()):
        x = torch.from_numpy(features(episode.observations, kitchen_goals)[:-1].copy())
        y = torch.from_numpy(np.asarray(episode.actions, dtype=np.float32))
        by_id[int(episode.id)] = (x, y)
    return [by_id[int(dataset.episode_indices[i])] for i in indices]  # back to the seed's order


def load_sequences(dataset_id: str, train_size: int | None, validation_size: int | None,
                   test_size: int | None, seed: int, minari_root: str | Path | None = None,
                   download: bool = False, kitchen_goals: str = "achieved_desired") -> SequenceData:
    """Behaviour-cloning sequences of a Minari dataset, split by episodes deterministically by `seed`.
    Sizes count episodes; None takes the default of `split_sizes`."""
    dataset = open_dataset(dataset_id, minari_root, download)
    total = int(dataset.total_episodes)
    sizes = split_sizes(dataset_id, total, train_size, validation_size, test_size)
    splits = _split(total, sizes, seed, dataset_id)
    train, validation, test = (_pairs(dataset, s, kitchen_goals) for s in splits)
    x, y = train[0]
    average = known_average_return(dataset_id)
    info = {
        "env_id": env_info(dataset_id).env_id,
        "dataset_episodes": total,
        "dataset_average_return": average,
    }
    return SequenceData(train, validation, test, input_size=int(x.shape[1]), output_size=int(y.shape[1]),
                        loss="mse", sequence_position="all", name=dataset_id, info=info)


def write_random_dataset(dataset_id: str, minari_root: str | Path, episodes: int, steps: int,
                         seed: int = 0) -> Path:
    """Record `episodes` random-policy episodes of at most `steps` steps in the dataset's real env and
    save them as a local Minari dataset `dataset_id` under `minari_root` (EpisodeBuffers, no jax).
    For tests and smoke runs without network. Returns the dataset's data directory."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env = make_env(dataset_id, max_episode_steps=steps)
    env.action_space.seed(seed)
    buffers = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            observations, actions, rewards, terminations, truncations = [_copy(obs)], [], [], [], []
            while True:
                action = env.action_space.sample()
                obs, reward, terminated, truncated, _ = env.step(action)
                observations.append(_copy(obs))  # kitchen hands back the same dict each step: copy it
                actions.append(action)
                rewards.append(float(reward))
                terminations.append(bool(terminated))
                truncations.append(bool(truncated))
                if terminated or truncated:
                    break
            buffers.append(EpisodeBuffer(
                id=i, seed=seed + i, observations=_stack(observations), actions=np.stack(actions),
                rewards=rewards, terminations=terminations, truncations=truncations))
        root = Path(minari_root)
        with _minari_root(root):
            minari.create_dataset_from_buffers(
                dataset_id, buffers, env=env, eval_env=env.spec, algorithm_name="random",
                description="random-policy episodes (gridfleet test data)")
    finally:
        env.close()
    return root / dataset_id / "data"


def _copy(obs: Any) -> Any:
    if isinstance(obs, dict):
        return {k: _copy(v) for k, v in obs.items()}
    return np.array(obs, copy=True)


def _stack(observations: list[Any]) -> Any:
    if isinstance(observations[0], dict):
        return {k: _stack([o[k] for o in observations]) for k in observations[0]}
    return np.stack(observations)
