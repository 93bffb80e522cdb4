"""Seed 001's own files (ASFaust/SLMfun, SystematicRNNExploration), read for `gridfleet import`.

`rnn_configs.json` (init_experiments.py) is a list of the nine RNN keys plus `id`, the sha256 of
`json.dumps(config, sort_keys=True)` (Python's default separators ", " and ": ") of those nine keys.
A results_01_all/<id>.json file (training_01_all.py) starts as a claim: "start time" and the config, written
before training; the finished file adds "loss" (the moving average every 50 steps), "min loss",
"training steps" (asked), "batch size", "history size", "dataset" and "end time".

Read top to bottom: the id, the two readers, then `import_body`, which turns them into a grid whose zip
group is the seed's config list and the finished runs as done jobs. No torch here: the caller passes the
trainer's parsed config so the checks use its defaults.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# The seed's own order (init_02_experiments.py's `to_copy`).
RNN_KEYS = ("use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate", "use_new_state",
            "use_old_state", "use_residual", "n_layers", "state_size")
FLAG_KEYS = RNN_KEYS[:7]
SEED_LOG_EVERY = 50  # training_01_all.py's log_frequency; the file does not record it
RESULT_KEYS = ("loss", "min loss", "training steps", "batch size", "history size", "dataset", "start time",
               "end time")


class SeedFileError(ValueError):
    """A seed file we cannot import; the message names the file and the entry or key."""


def seed_config_id(rnn: dict[str, Any]) -> str:
    """sha256 hex of the seed's serialisation of the nine RNN keys (and only those)."""
    if set(rnn) != set(RNN_KEYS):
        raise ValueError(f"the seed's config id covers exactly {', '.join(RNN_KEYS)}; got {sorted(rnn)}")
    return hashlib.sha256(json.dumps(rnn, sort_keys=True).encode("utf-8")).hexdigest()


def _rnn_part(entry: Any, where: str) -> dict[str, Any]:
    """The nine RNN keys of a seed entry, checked; `where` names the entry in errors."""
    if not isinstance(entry, dict):
        raise SeedFileError(f"{where}: expected a mapping, got {type(entry).__name__}")
    if "old id" in entry:
        raise SeedFileError(f"{where}: key 'old id': a later stage's config (rnn_configs_02.json) hashes its "
                            "parent's id in; import the first stage's rnn_configs.json and results_01_all")
    missing = [k for k in (*RNN_KEYS, "id") if k not in entry]
    if missing:
        raise SeedFileError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    rnn = {k: entry[k] for k in RNN_KEYS}
    for key in FLAG_KEYS:
        if not isinstance(rnn[key], bool):
            raise SeedFileError(f"{where}: key '{key}' must be true or false, got {rnn[key]!r}")
    for key in ("n_layers", "state_size"):
        if isinstance(rnn[key], bool) or not isinstance(rnn[key], int) or rnn[key] < 1:
            raise SeedFileError(f"{where}: key '{key}' must be a positive integer, got {rnn[key]!r}")
    if entry["id"] != seed_config_id(rnn):
        raise SeedFileError(f"{where}: id {str(entry['id'])[:80]!r} is not the sha256 of its config's sorted-keys "
                            f"JSON ({seed_config_id(rnn)})")
    return rnn


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SeedFileError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SeedFileError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def read_configs(path: Path) -> list[dict[str, Any]]:
    """rnn_configs.json as a list of the nine-key configs, in file order; ids checked, duplicates kept once."""
    data = _load_json(path)
    if not isinstance(data, list) or not data:
        raise SeedFileError(f"{path}: expected a non-empty list of configs (the seed's rnn_configs.json)")
    out, seen = [], set()
    for i, entry in enumerate(data):
        rnn = _rnn_part(entry, f"{path} entry {i}")
        if entry["id"] not in seen:
            seen.add(entry["id"])
            out.append(rnn)
    return out


@dataclass
class SeedResult:
    path: Path
    id: str
    rnn: dict[str, Any]
    file: dict[str, Any]


def read_results(paths: list[Path]) -> tuple[list[SeedResult], list[Path]]:
    """Finished result files, and the claims without a result (a run that died or is still going)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix == ".json"))
        elif path.is_file():
            files.append(path)
        else:
            raise SeedFileError(f"no such file or folder: {path}")
    finished, claims = [], []
    for path in files:
        data = _load_json(path)
        rnn = _rnn_part(data, str(path))
        if "loss" not in data:
            claims.append(path)
            continue
        missing = [k for k in RESULT_KEYS if k not in data]
        if missing:
            raise SeedFileError(f"{path}: a finished result needs {', '.join(repr(k) for k in missing)}")
        curve = data["loss"]
        if not isinstance(curve, list) or not curve or not all(_number(v) for v in curve):
            raise SeedFileError(f"{path}: 'loss' must be a non-empty list of numbers")
        for key in ("min loss", "start time", "end time"):
            if not _number(data[key]):
                raise SeedFileError(f"{path}: '{key}' must be a number, got {data[key]!r}")
        for key in ("training steps", "batch size", "history size"):
            if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 1:
                raise SeedFileError(f"{path}: '{key}' must be a positive integer, got {data[key]!r}")
        finished.append(SeedResult(path=path, id=data["id"], rnn=rnn, file=data))
    return finished, claims


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and abs(value) != float("inf")


def to_result(seed: SeedResult, log_every: int = SEED_LOG_EVERY) -> dict[str, Any]:
    """Our trainer's result keys from a finished seed file. The seed ran to the end of the window past its
    asked steps, so `steps` is that end; its curve has one point per `log_every` steps up to there."""
    data = seed.file
    per_window = data["history size"] - 1
    if per_window < 1:
        raise SeedFileError(f"{seed.path}: 'history size' must be at least 2")
    steps = -(-data["training steps"] // per_window) * per_window
    curve = data["loss"]
    if len(curve) != steps // log_every:
        raise SeedFileError(f"{seed.path}: 'loss' has {len(curve)} points; {data['training steps']} steps asked "
                            f"run to step {steps}, which logs {steps // log_every} at every {log_every}"
                            " (pass the seed's log_frequency as --log-every)")
    return {
        "min_loss": float(data["min loss"]), "steps": steps, "steps_asked": data["training steps"],
        "steps_mode": "finish_window", "loss_curve": [[log_every * (i + 1), float(v)] for i, v in enumerate(curve)],
        "seconds": round(float(data["end time"]) - float(data["start time"]), 2),
        "start_time": float(data["start time"]), "end_time": float(data["end time"]),
        "batch_size": data["batch size"], "history_size": data["history size"], "dataset": data["dataset"],
        "imported_from": seed.path.name,
    }


ParsedConfig = Callable[[dict[str, Any]], Any]  # the trainer's Config.model_validate


def _check_same_training(seed: SeedResult, cfg: Any, dataset: str) -> None:
    """A result belongs to a job only if the job's config trains as the seed's run did."""
    data = seed.file
    pairs = [("batch size", data["batch size"], "batch_size", cfg.batch_size),
             ("history size", data["history size"], "history", cfg.history),
             ("training steps", data["training steps"], "steps", cfg.steps),
             ("dataset", data["dataset"], "corpus", dataset)]
    for theirs, value, ours, mine in pairs:
        if value != mine:
            raise SeedFileError(f"{seed.path}: '{theirs}' is {value!r} but the grid's config has {ours} "
                                f"{mine!r}; set config.{ours} to match the seed's runs")
    if cfg.steps_mode != "finish_window":
        raise SeedFileError(f"{seed.path}: the seed's runs finish their last window; the grid's config has "
                            f"steps_mode {cfg.steps_mode!r} (set config.steps_mode: finish_window)")


def import_body(grid: dict[str, Any], configs: list[dict[str, Any]], results: list[SeedResult],
                parse: ParsedConfig, dataset_of: Callable[[str], str],
                log_every: int = SEED_LOG_EVERY) -> dict[str, Any]:
    """The body of POST /grids/import: the grid with the seed's configs as one zip group (replacing axes
    and zip groups on the nine RNN keys), and each finished result as a done job of that grid."""
    spec = copy.deepcopy(grid)
    spec["axes"] = {k: v for k, v in (spec.get("axes") or {}).items() if k not in RNN_KEYS}
    groups = spec.get("zip") or []
    groups = [groups] if isinstance(groups, dict) else groups
    spec["zip"] = [g for g in groups if not set(g) & set(RNN_KEYS)] + [
        {key: [c[key] for c in configs] for key in RNN_KEYS}]
    seeds = spec.get("seeds") or [0]
    if len(seeds) != 1:
        raise SeedFileError(f"grid seeds: the seed's runs had no seed of their own; import into a grid with one "
                            f"seed (got {seeds})")
    if spec["axes"] or len(spec["zip"]) > 1 or spec.get("sample"):
        raise SeedFileError("grid axes: besides the nine RNN keys the grid sweeps "
                            f"{sorted(spec['axes'])}; a seed result fits only one of those jobs, so import into "
                            "a grid that sweeps nothing else")
    known = {seed_config_id(c) for c in configs}
    base = spec.get("config") or {}
    done = []
    for seed in results:
        if seed.id not in known:
            raise SeedFileError(f"{seed.path}: id {seed.id} is not in the configs file")
        config = {**copy.deepcopy(base), **seed.rnn}  # as expand() builds the zip group's job
        cfg = parse(config)
        _check_same_training(seed, cfg, dataset_of(cfg.corpus))
        result = to_result(seed, log_every)
        done.append({"config": config, "seed": seeds[0], "result": result,
                     "started_at": result["start_time"], "finished_at": result["end_time"]})
    return {"grid": spec, "done": done}
