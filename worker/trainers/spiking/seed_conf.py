"""Seed 002's conf.json files, flat (its README's) and nested (its confExamples/DDQN_conf.json), as
snn_ddqn configs and one-job grids.

The nested file groups keys in sections: `algorithm_options` (learning_rate, decay, batch, gamma,
memorySize, startEbsilon, endEbsilon, numUpdateTS, nEpisodes, maxNumTimeSteps), `network` ("snn" or
"ann") with `network_options` (hidden_layers, snn_tSteps, snn_beta), `env` with `env_options`,
`stop_condition` (maxEpisodes, maxAvgPoint), plus `algorithm` and `finished` (Config fields of their
own). `flatten` lifts the sections' keys to the top, where the trainer's Config knows each under the
seed's own name (an alias), so a bad value is reported under the name the user wrote; an unknown key
inside a section is kept as "section.key" so the Config rejects it by that name.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

SECTIONS = {  # the keys each section may hold (all are Config aliases, so lifting them is enough)
    "algorithm_options": {"learning_rate", "decay", "batch", "gamma", "memorySize", "startEbsilon", "endEbsilon",
                          "numUpdateTS", "nEpisodes", "maxNumTimeSteps"},
    "network_options": {"hidden_layers", "snn_tSteps", "snn_beta"},
    "stop_condition": {"maxEpisodes", "maxAvgPoint"},
    "env_options": set(),
}
NESTED_MARKERS = frozenset({"algorithm", *SECTIONS})
ALGORITHM = "DDQN"  # the nested file's `algorithm`: the seed's other one, PPO, has no gridfleet trainer
FINISHED_MESSAGE = ("this conf.json is marked finished (the seed's trainer sets it when a run ends, and its "
                    "run.py then exits without training); set it to false to train again")
EPISODE_KEYS = ("nEpisodes", "episodes", "max_episodes", "num_episodes")  # the Config's names for its budget
DEFAULT_EPISODES = 15_000
FLAT_MARKERS = frozenset({"snn_tSteps", "snn_beta", "architecture", "stop_learning_at_win_percent", "hidden_layers"})


class SeedConfError(ValueError):
    """A key of a seed conf.json that cannot be mapped; the message starts with the key's path."""


def flatten(data: Any) -> Any:
    """The nested conf.json's sections lifted to the top level; anything else is returned unchanged."""
    if not isinstance(data, dict) or not NESTED_MARKERS & data.keys():
        return data
    flat = {k: v for k, v in data.items() if k not in SECTIONS}  # `algorithm` and `finished` are Config fields
    for section, known in SECTIONS.items():
        options = data.get(section)
        if options is None:
            continue
        if not isinstance(options, dict):
            raise SeedConfError(f"{section}: must be a mapping of the seed's keys, not {type(options).__name__}")
        if section == "env_options":
            options = _env_options(options)
        if section == "stop_condition":
            options = {k: v for k, v in options.items() if k != "maxEpisodes"}
        for key, value in options.items():
            name = key if key in known else f"{section}.{key}"
            if name in flat and flat[name] != value:
                raise SeedConfError(f"{section}.{key}: given twice, {value!r} here and {flat[name]!r} at the top "
                                    f"level; a grid over a nested base sweeps '{section}.{key}'")
            flat[name] = value
    stop = data.get("stop_condition")
    if isinstance(stop, dict) and "maxEpisodes" in stop:
        _cap_episodes(flat, stop["maxEpisodes"])
    return flat


def _env_options(options: dict[str, Any]) -> dict[str, Any]:
    """The seed reads one thing here: observation normalization through a Python object, which no JSON
    file can hold; off is accepted, on is an error."""
    rest = dict(options)
    for key in ("observationNormalization", "obsNormalizer"):
        if rest.pop(key, False) not in (False, None):
            raise SeedConfError(f"env_options.{key}: observation normalization is not supported (the seed "
                                "needs a Python normalizer object, obsNormalizer, which a conf.json cannot hold)")
    return rest


def _cap_episodes(flat: dict[str, Any], cap: Any) -> None:
    """stop_condition.maxEpisodes: the seed checks `maxEpisodes <= episode` after each 0-based episode, so
    it runs at most maxEpisodes + 1 of them, whatever nEpisodes says."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap != cap or cap < 0:
        raise SeedConfError(f"stop_condition.maxEpisodes: must be a number >= 0, not {cap!r}")
    key = next((k for k in EPISODE_KEYS if k in flat), "nEpisodes")
    budget = flat.get(key, DEFAULT_EPISODES)
    if isinstance(budget, int) and not isinstance(budget, bool) and cap + 1 < budget:
        flat[key] = int(cap) + 1


def is_seed_conf(data: dict[str, Any]) -> bool:
    """A seed-002 conf.json rather than a grid spec: no trainer/config keys, some of the seed's own."""
    if "trainer" in data or "config" in data:
        return False
    nested = bool({"algorithm_options", "network_options"} & data.keys()) or data.get("algorithm") in ("DDQN", "PPO")
    return nested or bool(FLAT_MARKERS & data.keys())


def grid_from_seed_conf(conf: dict[str, Any], force_new_run: bool = False, now: datetime | None = None) -> dict:
    """A one-job grid for a seed-002 conf.json, flat or nested (kept as written: the trainer maps it).
    Submitting the same file again adds nothing, so the job (resumed from its checkpoints by whichever
    worker runs it) continues: `continue_run: true`. With `continue_run: false` or `force_new_run` (the
    seed's --forcenewrun) a run_tag makes it a new job."""
    config = dict(conf)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(config.get("name") or "snn-ddqn")).strip("-._")[:100] or "snn-ddqn"
    if force_new_run or not config.get("continue_run", True):
        config["run_tag"] = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    return {"name": name, "trainer": "snn_ddqn", "config": config, "objective": "max:mean_return"}
