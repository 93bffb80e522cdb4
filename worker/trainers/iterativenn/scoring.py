"""Reward scoring (seed 000's Score_AD): roll a trained policy out in its dataset's Gymnasium Robotics
env and report its average return next to the dataset's own.

    score = score_policy(policy_step, "D4RL/door/expert-v2", episodes=10, seed=0)
    # {"average_return": ..., "return_ratio": average_return / 2923.66, ...}

`policy_step(history) -> action`: `history` is a float32 CPU tensor [t, input_size] holding the
episode's observations so far (as `minari_data.features` flattens them, the same x the model was trained
on), t = 1 at the start of each episode. The policy returns the action for the newest observation
(anything np.asarray turns into [action_size]). Seed 000 feeds the growing history each step: a
sequence model runs over all of it and takes its last output; a policy that keeps its own state may read
only history[-1], and must start afresh whenever t == 1.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from .minari_data import env_info, features, known_average_return, make_env

PolicyStep = Callable[[torch.Tensor], Any]


def score_policy(policy_step: PolicyStep, dataset_id: str, episodes: int, seed: int,
                 max_episode_steps: int | None = None,
                 dataset_average_return: float | None = None,
                 kitchen_goals: str = "achieved_desired") -> dict[str, float]:
    """Run `episodes` episodes (reset with seed, seed + 1, ...) of at most `max_episode_steps` steps
    (default: the dataset's own limit, e.g. 200 for Adroit door) and return numeric metrics:
    average_return, return_std, average_length, episodes, nonfinite_actions, and, when the dataset's
    average is known (or given), dataset_average_return and return_ratio = average_return / it.

    Actions are clipped to the env's action space; a non-finite action is replaced by zeros and
    counted in `nonfinite_actions` rather than crashing the job after training."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    steps_limit = env_info(dataset_id).max_episode_steps if max_episode_steps is None else max_episode_steps
    env = make_env(dataset_id, max_episode_steps=steps_limit)
    low, high = env.action_space.low, env.action_space.high
    returns, lengths, nonfinite = [], [], 0
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            first = features(obs, kitchen_goals)
            # One buffer per episode; the policy sees a growing view of it (no copy per step).
            history = torch.zeros(steps_limit + 1, first.shape[0], dtype=torch.float32)
            history[0] = torch.from_numpy(first)
            total, t = 0.0, 0
            while True:
                with torch.no_grad():
                    action = np.asarray(policy_step(history[: t + 1]), dtype=np.float64).reshape(low.shape)
                if not np.all(np.isfinite(action)):
                    nonfinite += 1
                    action = np.zeros_like(action)
                obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high))
                total += float(reward)
                t += 1
                if terminated or truncated or t >= steps_limit:
                    break
                history[t] = torch.from_numpy(features(obs, kitchen_goals))
            returns.append(total)
            lengths.append(t)
    finally:
        env.close()

    average = float(np.mean(returns))
    result: dict[str, float] = {
        "average_return": average,
        "return_std": float(np.std(returns)),
        "average_length": float(np.mean(lengths)),
        "episodes": float(episodes),
        "nonfinite_actions": float(nonfinite),
    }
    reference = dataset_average_return if dataset_average_return is not None else known_average_return(dataset_id)
    if reference is not None and math.isfinite(reference) and reference != 0:
        result["dataset_average_return"] = float(reference)
        result["return_ratio"] = average / reference
    return result
