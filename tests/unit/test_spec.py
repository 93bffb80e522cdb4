"""Grid spec validation and expansion, and the retry policy's backoff: pure logic, no database."""
from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from pydantic import ValidationError

from scheduler.policy import RetryPolicy
from scheduler.spec import MAX_JOBS_PER_GRID, GridError, GridSpec, expand, job_key

SEED_001_FLAGS = [
    "use_input_gate", "use_forget_gate", "use_output_gate", "use_state_gate",
    "use_new_state", "use_old_state", "use_residual",
]


def spec(**fields) -> GridSpec:
    fields.setdefault("name", "g")
    fields.setdefault("trainer", "noop")
    return GridSpec.model_validate(fields)


def error_locs(exc: ValidationError) -> list[tuple]:
    return [tuple(err["loc"]) for err in exc.errors()]


# ---- expansion -----------------------------------------------------------------------------------
def test_expansion_order_is_deterministic_axes_in_spec_order_last_axis_fastest():
    s = spec(axes={"a": [1, 2], "b": ["x", "y", "z"]}, seeds=[7, 8])
    jobs = expand(s)
    got = [(j.config["a"], j.config["b"], j.seed) for j in jobs]
    want = [(a, b, seed) for a, b, seed in itertools.product([1, 2], ["x", "y", "z"], [7, 8])]
    assert got == want
    # the same spec, built again, expands to the same keys in the same order
    again = expand(spec(axes={"a": [1, 2], "b": ["x", "y", "z"]}, seeds=[7, 8]))
    assert [j.key for j in again] == [j.key for j in jobs]


@pytest.mark.parametrize("sizes", [[1], [3], [2, 3], [2, 3, 4], [5, 1, 2, 2]])
def test_cartesian_product_counts(sizes):
    axes = {f"p{i}": list(range(n)) for i, n in enumerate(sizes)}
    jobs = expand(spec(axes=axes))
    expected = 1
    for n in sizes:
        expected *= n
    assert len(jobs) == expected
    assert len({j.key for j in jobs}) == expected
    combos = {tuple(j.config[f"p{i}"] for i in range(len(sizes))) for j in jobs}
    assert combos == set(itertools.product(*[range(n) for n in sizes]))


def test_no_axes_is_one_job_with_the_base_config():
    jobs = expand(spec(config={"lr": 0.1, "nested": {"k": 1}}))
    assert len(jobs) == 1
    assert jobs[0].config == {"lr": 0.1, "nested": {"k": 1}}
    assert jobs[0].seed == 0


def test_zip_group_advances_together():
    s = spec(axes={"a": [1, 2]}, zip=[{"lr": [0.1, 0.01, 0.001], "wd": [0.0, 0.5, 0.9]}])
    jobs = expand(s)
    assert len(jobs) == 2 * 3
    pairs = {(j.config["lr"], j.config["wd"]) for j in jobs}
    assert pairs == {(0.1, 0.0), (0.01, 0.5), (0.001, 0.9)}
    assert [(j.config["a"], j.config["lr"]) for j in jobs] == [
        (1, 0.1), (1, 0.01), (1, 0.001), (2, 0.1), (2, 0.01), (2, 0.001)
    ]


def test_zip_as_a_dict_is_one_group_and_several_groups_multiply():
    one = spec(zip={"lr": [1, 2, 3], "wd": [4, 5, 6]})
    assert len(one.zip) == 1
    assert len(expand(one)) == 3
    two = spec(zip=[{"lr": [1, 2, 3], "wd": [4, 5, 6]}, {"h": [8, 16]}])
    jobs = expand(two)
    assert len(jobs) == 3 * 2
    assert {(j.config["lr"], j.config["wd"], j.config["h"]) for j in jobs} == {
        (lr, wd, h) for lr, wd in [(1, 4), (2, 5), (3, 6)] for h in (8, 16)
    }


def test_zip_unequal_lengths_rejected_naming_zip():
    with pytest.raises(ValidationError) as info:
        spec(zip={"lr": [1, 2, 3], "wd": [4, 5]})
    assert ("zip",) in error_locs(info.value)
    assert "equal lengths" in str(info.value)


def test_seeds_multiply_jobs_and_are_part_of_identity():
    jobs = expand(spec(axes={"a": [1, 2, 3]}, seeds=[0, 1, 2, 3]))
    assert len(jobs) == 12
    assert {j.seed for j in jobs} == {0, 1, 2, 3}
    by_config = {}
    for j in jobs:
        by_config.setdefault(j.config["a"], set()).add(j.seed)
    assert all(seeds == {0, 1, 2, 3} for seeds in by_config.values())
    assert len({j.key for j in jobs}) == 12


def test_dotted_axis_keys_set_nested_config_without_touching_the_base():
    base = {"optim": {"name": "adam", "lr": 1.0}, "model": {"hidden": 8}}
    s = spec(config=base, axes={"optim.lr": [0.1, 0.2], "model.layers.n": [1]})
    jobs = expand(s)
    assert [j.config for j in jobs] == [
        {"optim": {"name": "adam", "lr": 0.1}, "model": {"hidden": 8, "layers": {"n": 1}}},
        {"optim": {"name": "adam", "lr": 0.2}, "model": {"hidden": 8, "layers": {"n": 1}}},
    ]
    assert s.config == {"optim": {"name": "adam", "lr": 1.0}, "model": {"hidden": 8}}
    jobs[0].config["optim"]["lr"] = 99  # configs are independent copies
    assert jobs[1].config["optim"]["lr"] == 0.2


def test_dotted_axis_through_a_non_mapping_is_a_grid_error():
    with pytest.raises(GridError) as info:
        expand(spec(config={"optim": 3}, axes={"optim.lr": [0.1]}))
    assert info.value.field == "axes.optim.lr"


def test_exclude_removes_matching_configs():
    s = spec(axes={"a": [1, 2], "b": [1, 2]}, exclude=[{"a": 1, "b": 2}])
    assert {(j.config["a"], j.config["b"]) for j in expand(s)} == {(1, 1), (2, 1), (2, 2)}


def test_exclude_with_dotted_keys():
    s = spec(axes={"m.a": [1, 2], "m.b": [1, 2]}, exclude=[{"m.a": 2}])
    assert {(j.config["m"]["a"], j.config["m"]["b"]) for j in expand(s)} == {(1, 1), (1, 2)}


def _seed_001_spec(**extra) -> GridSpec:
    axes = {flag: [True, False] for flag in SEED_001_FLAGS}
    axes.update({"n_layers": [1, 2, 3], "state_size": [32, 256]})
    return spec(
        name="seed-001",
        axes=axes,
        exclude=[
            {"use_new_state": False, "use_old_state": False},
            {"state_size": 32, "use_residual": False},
        ],
        **extra,
    )


def test_seed_001_grid_expands_to_432_jobs():
    jobs = expand(_seed_001_spec())
    assert len(jobs) == 432
    assert len({j.key for j in jobs}) == 432
    for j in jobs:
        assert j.config["use_new_state"] or j.config["use_old_state"]
        assert not (j.config["state_size"] == 32 and not j.config["use_residual"])
    # Independently: brute force over the full product, filtering by the two rules.
    brute = 0
    for values in itertools.product(*([[True, False]] * 7), [1, 2, 3], [32, 256]):
        cfg = dict(zip(SEED_001_FLAGS + ["n_layers", "state_size"], values))
        if not cfg["use_new_state"] and not cfg["use_old_state"]:
            continue
        if cfg["state_size"] == 32 and not cfg["use_residual"]:
            continue
        brute += 1
    assert brute == len(jobs)
    # Without the exclusions it is the full 2^7 * 3 * 2 product.
    full = _seed_001_spec()
    full.exclude.clear()
    assert len(expand(full)) == 2**7 * 3 * 2


def test_seed_001_with_three_seeds():
    assert len(expand(_seed_001_spec(seeds=[0, 1, 2]))) == 432 * 3


# ---- job identity --------------------------------------------------------------------------------
def test_job_key_is_sha256_of_canonical_sorted_json():
    config = {"b": 2, "a": {"y": [1, 2], "x": "é"}}
    canonical = json.dumps(
        {"trainer": "noop", "config": config, "seed": 3}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert job_key("noop", config, 3) == hashlib.sha256(canonical.encode()).hexdigest()


def test_job_key_is_independent_of_dict_key_order_and_depends_on_every_part():
    a = {"x": 1, "y": {"p": 1, "q": 2}}
    b = {"y": {"q": 2, "p": 1}, "x": 1}
    assert job_key("noop", a, 0) == job_key("noop", b, 0)
    assert job_key("noop", a, 0) != job_key("noop", a, 1)
    assert job_key("noop", a, 0) != job_key("sleep", a, 0)
    assert job_key("noop", a, 0) != job_key("noop", {"x": 2, "y": {"p": 1, "q": 2}}, 0)


def test_expanded_job_keys_match_job_key_and_ignore_axis_order():
    one = expand(spec(axes={"a": [1, 2], "b": [3]}))
    two = expand(spec(axes={"b": [3], "a": [1, 2]}))
    assert {j.key for j in one} == {j.key for j in two}
    for j in one:
        assert j.key == job_key("noop", j.config, j.seed)


def test_duplicate_axis_values_make_one_job():
    assert len(expand(spec(axes={"a": [1, 1, 2]}))) == 2


def test_nan_in_config_is_a_grid_error():
    with pytest.raises(GridError) as info:
        expand(spec(axes={"lr": [float("nan")]}))
    assert info.value.field == "config"


# ---- limits and validation -----------------------------------------------------------------------
def test_more_than_max_jobs_rejected_naming_axes():
    # 10 * 10 * 10 * 10 * 11 = 110,000 > 100,000
    axes = {f"p{i}": list(range(10)) for i in range(4)}
    axes["p4"] = list(range(11))
    with pytest.raises(GridError) as info:
        expand(spec(axes=axes))
    assert info.value.field == "axes"
    assert "axes" in str(info.value)
    assert f"{MAX_JOBS_PER_GRID:,}" in str(info.value)


def test_seeds_count_towards_the_job_limit():
    axes = {f"p{i}": list(range(10)) for i in range(5)}  # exactly 100,000 configs
    with pytest.raises(GridError):
        expand(spec(axes=axes, seeds=[0, 1]))


def test_exactly_max_jobs_is_allowed():
    axes = {f"p{i}": list(range(10)) for i in range(5)}
    assert len(expand(spec(axes=axes))) == MAX_JOBS_PER_GRID


@pytest.mark.parametrize(
    "fields, loc, words",
    [
        ({"axes": {"lr": []}}, ("axes",), "lr"),
        ({"axes": {"lr": 0.1}}, ("axes", "lr"), "list"),
        ({"axes": {"lr": "0.1"}}, ("axes", "lr"), "list"),
        ({"name": "bad name"}, ("name",), "pattern"),
        ({"name": ""}, ("name",), ""),
        ({"name": "-leading-dash"}, ("name",), "pattern"),
        ({"name": "x" * 101}, ("name",), ""),
        ({"seeds": [1, 2, 1]}, ("seeds",), "duplicates"),
        ({"seeds": []}, ("seeds",), "empty"),
        ({"axes": {"lr": [1, 2]}, "zip": {"lr": [1, 2], "wd": [3, 4]}}, ("zip",), "lr"),
        ({"zip": [{"a": [1]}, {"a": [2]}]}, ("zip",), "'a'"),
        ({"zip": [{}]}, ("zip",), "empty"),
        ({"unknown_field": 1}, ("unknown_field",), ""),
        ({"objective": "loss"}, ("objective",), ""),
        ({"max_attempts": 0}, ("max_attempts",), ""),
        ({"resources": {"gpus": -1}}, ("resources", "gpus"), ""),
    ],
)
def test_bad_specs_rejected_naming_the_field(fields, loc, words):
    with pytest.raises(ValidationError) as info:
        spec(**fields)
    assert loc in error_locs(info.value)
    assert words in str(info.value)


def test_valid_name_characters():
    assert spec(name="Run_1.v2-b").name == "Run_1.v2-b"


# ---- retry policy ----------------------------------------------------------------------------------
def test_backoff_error_is_exponential_and_capped():
    policy = RetryPolicy(backoff_base_seconds=5.0, backoff_max_seconds=60.0)
    got = [policy.backoff("error", n) for n in range(1, 8)]
    assert got == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert policy.backoff("error", 100) == 60.0


def test_backoff_lost_first_retry_is_immediate_then_exponential():
    policy = RetryPolicy(backoff_base_seconds=2.0, backoff_max_seconds=100.0)
    assert [policy.backoff("lost", n) for n in range(1, 7)] == [0.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    assert policy.backoff("lost", 50) == 100.0


def test_backoff_preempted_is_always_zero():
    policy = RetryPolicy(backoff_base_seconds=5.0)
    assert all(policy.backoff("preempted", n) == 0.0 for n in range(0, 50))


def test_backoff_zero_count_is_zero():
    policy = RetryPolicy()
    assert policy.backoff("error", 0) == 0.0
    assert policy.backoff("lost", 0) == 0.0


@pytest.mark.parametrize("store", ["local", "hf://alice/ckpts", "hf://alice/ckpts@runs", "hf://a-b/c.d_e@x/y"])
def test_store_accepts_local_and_hub_repos(store):
    assert GridSpec.model_validate({"name": "g", "trainer": "noop", "store": store}).store == store


@pytest.mark.parametrize("store", ["s3://bucket", "hf://alice", "hf://alice/ckpts/extra", "hf://al--ice/x", "", "hf://"])
def test_store_rejects_unknown_schemes_and_bad_repo_ids_naming_store(store):
    with pytest.raises(ValidationError) as info:
        GridSpec.model_validate({"name": "g", "trainer": "noop", "store": store})
    assert error_locs(info.value) == [("store",)]
