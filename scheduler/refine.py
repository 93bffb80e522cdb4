"""`gridfleet refine`: the top of a finished grid by its objective, as a follow-up grid with some keys changed
(seed 001's next stage: the best 10 % again with 512 units, 3 layers, 50,000 steps). Pure logic, no database.

Read in order: `parse_top` and `parse_sets` read the command line; `choose` ranks the parent's results;
`refined_spec` writes the new grid: the keys the chosen configs share go in `config`, the rest in one zip
group (so the grid expands to exactly the chosen configs, changed), linked to its parent by `parent`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any

import yaml

from scheduler.spec import GridError, canonical_json, is_number, set_path

CARRIED = ("trainer", "objective", "priority", "max_attempts", "resources", "code_rev", "store", "seeds")


class RefineError(ValueError):
    """A refine request a person must change; the message says what."""


def parse_top(text: str) -> tuple[str, float]:
    """'10%' -> ('percent', 10.0); '5' -> ('count', 5)."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1])
            if not 0 < value <= 100:
                raise ValueError
            return "percent", value
        count = int(raw)
        if count < 1:
            raise ValueError
        return "count", count
    except ValueError:
        raise RefineError(f"--top must be a percentage in (0, 100] like 10% or a count >= 1 like 20; got {text!r}") \
            from None


def parse_sets(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE read as JSON, else YAML (512 is a number, 1e-3 too, true a bool, [1, 2] a list,
    other text a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RefineError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value, parse_constant=_no_constant)  # first: YAML 1.1 reads 1e-3 as a string
        except ValueError:
            try:
                out[key] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                raise RefineError(f"--set {key}: cannot read {value!r} as a value") from None
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is no JSON value")


def choose(results: list[dict[str, Any]], objective: str, top: tuple[str, float]) -> list[dict[str, Any]]:
    """The best succeeded jobs by `objective` ('min:loss'): a count, or a percentage of those with a value
    (rounded down as the seed's int(len * 0.1), at least one)."""
    direction, sep, metric = objective.partition(":")
    if not sep or direction not in ("min", "max") or not metric:
        raise RefineError(f"objective must be min:METRIC or max:METRIC, got {objective!r}")
    scored = [r for r in results if r.get("state") == "succeeded" and isinstance(r.get("result"), dict)
              and is_number(r["result"].get(metric))]
    if not scored:
        raise RefineError(f"no finished job has a value for '{metric}' yet; nothing to refine")
    scored.sort(key=lambda r: ((1 if direction == "min" else -1) * r["result"][metric], r["job_id"]))
    kind, amount = top
    count = int(amount) if kind == "count" else max(1, math.floor(len(scored) * amount / 100 + 1e-9))
    return scored[:count]


def refined_spec(parent: dict[str, Any], chosen: list[dict[str, Any]], sets: dict[str, Any],
                 name: str | None = None) -> dict[str, Any]:
    """A grid spec (JSON-ready) of the chosen configs with `sets` applied, linked to `parent` (its summary:
    name and spec). The name defaults to one made from the parent, the count and the changes, so running
    the same refine again adds nothing."""
    configs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in chosen:
        config = copy.deepcopy(row["config"])
        for key, value in sets.items():
            try:
                set_path(config, key, copy.deepcopy(value))
            except GridError as exc:
                raise RefineError(f"--set {key}: {exc.message}") from None
        marker = canonical_json(config)
        if marker not in seen:  # two parents that differ only in a changed key become one job
            seen.add(marker)
            configs.append(config)
    keys = list(dict.fromkeys(k for c in configs for k in c))
    partial = [k for k in keys if any(k not in c for c in configs)]
    if partial:
        raise RefineError(f"key '{partial[0]}' is set in some of the chosen configs and not in others; "
                          "refine needs configs with the same keys")
    shared = {k: configs[0][k] for k in keys if all(canonical_json(c[k]) == canonical_json(configs[0][k])
                                                    for c in configs)}
    varying = [k for k in keys if k not in shared]
    spec_in = parent["spec"]
    spec: dict[str, Any] = {k: copy.deepcopy(spec_in[k]) for k in CARRIED if spec_in.get(k) is not None}
    spec["config"] = shared
    if varying:
        spec["zip"] = [{k: [c[k] for c in configs] for k in varying}]
    spec["parent"] = parent["name"]
    digest = hashlib.sha256(canonical_json({"jobs": [r["job_id"] for r in chosen], "set": sets}).encode()).hexdigest()
    spec["name"] = name or f"{parent['name'][:80]}-top{len(chosen)}-{digest[:6]}"
    return spec
