"""`search:` in a grid spec (scheduler/spec.py): parameter checks, finite spaces, the objective it implies,
the probes validated at POST, and the example file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from scheduler.spec import GridSpec, SearchParam, expand, search_probes, validate_jobs, with_params
from worker import trainers

XY = {"x": {"type": "float", "low": -1, "high": 1}, "y": {"type": "float", "low": 0, "high": 2}}


def grid(**search) -> GridSpec:
    return GridSpec(name="s", trainer="objective", search={"n_trials": 4, "space": XY, "metric": "loss", **search})


def test_finite_values_and_space_size():
    assert SearchParam(type="int", low=1, high=4).values() == [1, 2, 3, 4]
    assert SearchParam(type="int", low=0, high=10, step=5).values() == [0, 5, 10]
    assert SearchParam(type="float", low=0, high=1, step=0.5).values() == [0.0, 0.5, 1.0]
    assert SearchParam(type="float", low=0, high=1).values() is None
    assert SearchParam(type="categorical", choices=["a", 1, None]).values() == ["a", 1, None]
    assert SearchParam(type="float", low=-1e308, high=1e308, step=1e-300).values() is None  # no overflow
    spec = grid(n_trials=6, space={"level": {"type": "int", "low": 0, "high": 2},
                                   "kind": {"type": "categorical", "choices": ["flat", "bump"]}})
    assert spec.search.space_size() == 6
    assert grid().search.space_size() is None


@pytest.mark.parametrize("param,words", [
    ({"type": "float", "low": 1, "high": 0}, "low <= high"),
    ({"type": "float", "low": 0, "high": 1, "log": True}, "0 < low"),
    ({"type": "float", "low": 1, "high": 2, "log": True, "step": 0.5}, "log or step"),
    ({"type": "int", "low": 0.5, "high": 2}, "whole"),
    ({"type": "int", "low": 0, "high": 2**60}, "2**53"),
    ({"type": "float", "low": 0}, "both low and high"),
    ({"type": "categorical", "choices": []}, "non-empty"),
    ({"type": "categorical", "choices": ["a", "a"]}, "duplicates"),
    ({"type": "categorical", "choices": [[1, 2]]}, "null, booleans, numbers or strings"),
    ({"type": "categorical", "choices": ["a"], "low": 0}, "only `choices`"),
    ({"type": "float", "low": 0, "high": 1, "choices": [1]}, "not choices"),
])
def test_bad_parameters_name_their_key(param, words):
    with pytest.raises(ValidationError) as info:
        grid(space={"x": param})
    error = info.value.errors()[0]
    assert error["loc"][:3] == ("search", "space", "x") and words in error["msg"], info.value


def test_the_search_and_the_objective_agree():
    assert grid().objective == "min:loss"
    assert grid(direction="maximize").objective == "max:loss"
    spec = GridSpec(name="s", trainer="objective", objective="max:acc", search={"n_trials": 2, "space": XY})
    assert (spec.search.metric, spec.search.direction) == ("acc", "maximize")
    with pytest.raises(ValidationError, match="make them agree"):
        GridSpec(name="s", trainer="objective", objective="max:acc",
                 search={"n_trials": 2, "space": XY, "metric": "loss"})
    with pytest.raises(ValidationError, match="name the result key"):
        GridSpec(name="s", trainer="objective", search={"n_trials": 2, "space": XY})


def test_the_stored_spec_validates_again_unchanged():
    """The search loop re-reads the spec the grid stored (model_dump) and must get the same search."""
    spec = grid(sampler="cmaes", parallel=3)
    again = GridSpec.model_validate(spec.model_dump(mode="json"))
    assert again == spec


def test_samplers_that_do_not_fit_the_space():
    with pytest.raises(ValidationError, match="grid sampler needs finitely many values"):
        grid(sampler="grid")
    with pytest.raises(ValidationError, match="cmaes searches float and int"):
        grid(sampler="cmaes", space={**XY, "kind": {"type": "categorical", "choices": ["flat", "bump"]}})
    with pytest.raises(ValidationError, match="only 2 distinct configs"):
        grid(n_trials=3, space={"kind": {"type": "categorical", "choices": ["flat", "bump"]}})
    with pytest.raises(ValidationError, match="both searched and swept"):
        GridSpec(name="s", trainer="objective", axes={"x": [1]}, search={"n_trials": 2, "space": XY,
                                                                        "metric": "loss"})


def test_points_probes_and_params():
    spec = GridSpec(name="s", trainer="objective", axes={"function": ["quadratic", "branin"]}, seeds=[0, 1],
                    search={"n_trials": 5, "metric": "loss", "space": {
                        "x": {"type": "float", "low": -1, "high": 1},
                        "kind": {"type": "categorical", "choices": ["flat", "bump"]}}})
    points = expand(spec)
    assert len(points) == 4 and spec.job_count_upper_bound() == 20
    probes = search_probes(spec, points)
    assert len(probes) == 4 * 4  # per point: x at both ends, kind at both choices
    assert {(p.config["x"], p.config["kind"]) for p in probes} == {(-1.0, "flat"), (1.0, "flat"), (-1.0, "bump")}
    validate_jobs(spec, probes, trainers.validate_config)
    assert with_params({"optim": {"lr": 1}}, {"optim.lr": 0.5, "x": 2}) == {"optim": {"lr": 0.5}, "x": 2}


def test_a_probe_outside_the_trainers_bounds_is_refused():
    spec = grid(space={"level": {"type": "int", "low": 0, "high": 5000}})
    with pytest.raises(trainers.InvalidConfig, match="config.level"):
        validate_jobs(spec, search_probes(spec, expand(spec)), trainers.validate_config)


def test_the_example_search_validates():
    path = Path(__file__).resolve().parents[2] / "examples" / "objective_search.yaml"
    spec = GridSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.search.sampler == "tpe" and spec.search.n_trials == 40 and spec.objective == "min:loss"
    validate_jobs(spec, search_probes(spec, expand(spec)), trainers.validate_config)
