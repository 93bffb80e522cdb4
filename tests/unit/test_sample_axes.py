"""Grid `sample` axes (seed 000's random-network runners): n draws from distributions, deterministic in the
spec, so re-posting a grid makes the same jobs. Pure logic, no database."""
from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from scheduler.spec import GridError, GridSpec, expand


def spec(**fields) -> GridSpec:
    fields.setdefault("name", "g")
    fields.setdefault("trainer", "noop")
    return GridSpec.model_validate(fields)


PARAMS = {
    "learning_rate": {"log_uniform": [1e-5, 1e-2]},
    "hidden_size": {"uniform_int": [50, 500]},
    "density": {"normal": [0.5, 0.25], "abs": True, "clip": [0.02, 1.0], "round": 2},
    "optim.beta": {"uniform": [0.8, 0.99]},
    "model_type": {"choice": ["description", "lstm"]},
}


def test_n_draws_in_range_and_the_same_every_time():
    s = spec(config={"optim": {"eps": 1e-8}}, sample={"n": 200, "seed": 7, "params": PARAMS})
    jobs = expand(s)
    assert len(jobs) == 200 == s.job_count_upper_bound()
    again = expand(spec(config={"optim": {"eps": 1e-8}}, sample={"n": 200, "seed": 7, "params": PARAMS}))
    assert [j.key for j in jobs] == [j.key for j in again]  # re-posting adds nothing
    other = expand(spec(config={"optim": {"eps": 1e-8}}, sample={"n": 200, "seed": 8, "params": PARAMS}))
    assert not {j.key for j in jobs} & {j.key for j in other}
    lrs = [j.config["learning_rate"] for j in jobs]
    assert all(1e-5 <= v <= 1e-2 for v in lrs)
    logs = [math.log10(v) for v in lrs]  # log-uniform: about half the draws below the geometric middle
    assert 70 < sum(v < -3.5 for v in logs) < 130
    hidden = [j.config["hidden_size"] for j in jobs]
    assert all(isinstance(h, int) and 50 <= h <= 500 for h in hidden)
    assert min(hidden) < 80 and max(hidden) > 470  # both ends are reachable
    dens = [j.config["density"] for j in jobs]
    assert all(0.02 <= d <= 1.0 and round(d, 2) == d for d in dens)
    assert 0.35 < sum(dens) / len(dens) < 0.65
    betas = [j.config["optim"]["beta"] for j in jobs]
    assert all(0.8 <= b <= 0.99 for b in betas) and all(j.config["optim"]["eps"] == 1e-8 for j in jobs)
    assert {j.config["model_type"] for j in jobs} == {"description", "lstm"}


def test_adding_a_param_leaves_the_other_draws_alone():
    base = expand(spec(sample={"n": 10, "params": {"a": {"uniform": [0, 1]}}}))
    more = expand(spec(sample={"n": 10, "params": {"a": {"uniform": [0, 1]}, "b": {"uniform": [0, 1]}}}))
    assert [j.config["a"] for j in base] == [j.config["a"] for j in more]


def test_samples_cross_with_axes_and_seeds():
    jobs = expand(spec(axes={"dataset": ["x", "y"]}, seeds=[0, 1],
                       sample={"n": 3, "params": {"lr": {"uniform": [0.1, 0.2]}}}))
    assert len(jobs) == 2 * 3 * 2
    draws = {j.config["lr"] for j in jobs}
    assert len(draws) == 3  # the same 3 draws for every dataset and seed


def test_template_and_format_build_seed_000_block_strings():
    config = {"block_types": [[0, 0, 0], ["R=0.1"] * 3, ["R=0.1"] * 3],
              "initialization_types": [[0, 0, 0], ["G=0,0.05"] * 3, ["G=0,0.05"] * 3]}
    params = {
        "block_types.1.0": {"uniform": [0.02, 1.0], "round": 2, "format": "R={}"},
        "initialization_types.2.1": {"template": "G={mean},{std}",
                                     "fields": {"mean": {"normal": [0, 0.0025], "round": 3},
                                                "std": {"normal": [0.05, 0.015], "clip": [0.0001, None], "round": 3}}},
    }
    jobs = expand(spec(config=config, sample={"n": 5, "params": params}))
    for job in jobs:
        r = job.config["block_types"][1][0]
        assert r.startswith("R=") and 0.02 <= float(r[2:]) <= 1.0
        assert job.config["block_types"][1][1] == "R=0.1"  # only the indexed entry changes
        g = job.config["initialization_types"][2][1]
        _mean, std = (float(v) for v in g[2:].split(","))
        assert g.startswith("G=") and std >= 0.0001
    assert config["block_types"][1][0] == "R=0.1"  # the base config is not modified
    assert len({j.config["block_types"][1][0] for j in jobs}) > 1


def test_list_indexes_in_axes_too():
    jobs = expand(spec(config={"row_sizes": [39, 300, 28]}, axes={"row_sizes.1": [100, 200]}))
    assert [j.config["row_sizes"] for j in jobs] == [[39, 100, 28], [39, 200, 28]]
    with pytest.raises(GridError):
        expand(spec(config={"row_sizes": [39, 300, 28]}, axes={"row_sizes.5.x": [1]}))


@pytest.mark.parametrize("sample, words", [
    ({"n": 2, "params": {"a": {}}}, "exactly one"),
    ({"n": 2, "params": {"a": {"uniform": [1, 0]}}}, "low <= high"),
    ({"n": 2, "params": {"a": {"log_uniform": [0, 1]}}}, "0 < low"),
    ({"n": 2, "params": {"a": {"normal": [0, -1]}}}, "sigma"),
    ({"n": 2, "params": {"a": {"uniform": [0, 1], "normal": [0, 1]}}}, "exactly one"),
    ({"n": 2, "params": {"a": {"uniform": [0, 1], "format": "R="}}}, "format"),
    ({"n": 2, "params": {"a": {"template": "G={m}", "fields": {"s": {"uniform": [0, 1]}}}}}, "template"),
    ({"n": 0, "params": {"a": {"uniform": [0, 1]}}}, "n"),
    ({"n": 2, "params": {}}, "params"),
    ({"n": 2, "params": {"a": {"uniform": [0, 1], "shape": 3}}}, "shape"),
])
def test_bad_samples_are_refused_naming_the_problem(sample, words):
    with pytest.raises(ValidationError) as info:
        spec(sample=sample)
    assert words in str(info.value)
    assert all(err["loc"][0] == "sample" for err in info.value.errors())


def test_a_key_cannot_be_both_swept_and_sampled():
    with pytest.raises(ValidationError, match="both sampled and swept"):
        spec(axes={"lr": [1, 2]}, sample={"n": 2, "params": {"lr": {"uniform": [0, 1]}}})
    with pytest.raises(ValidationError, match="both sampled and swept"):
        spec(zip={"lr": [1, 2], "b": [3, 4]}, sample={"n": 2, "params": {"lr": {"uniform": [0, 1]}}})


def test_job_count_bound_includes_the_draws():
    s = spec(axes={"a": [1, 2, 3]}, sample={"n": 40_000, "params": {"x": {"uniform": [0, 1]}}})
    assert s.job_count_upper_bound() == 120_000
    with pytest.raises(GridError, match="limit"):
        expand(s)


# ---- seed 000's example grids ------------------------------------------------------------------------
def test_seed000_example_grids_expand_and_validate():
    from pathlib import Path

    import yaml

    from scheduler.spec import validate_jobs
    from worker import trainers

    examples = Path(__file__).resolve().parents[2] / "examples"
    ra = GridSpec.model_validate(yaml.safe_load((examples / "seed000_random_anomaly.yaml").read_text()))
    jobs = expand(ra)
    assert len(jobs) == (3 + 1 + 1) * 2  # 3 densities of the block model, one LSTM, one GRU; 2 seeds
    validate_jobs(ra, jobs, trainers.validate_config)
    assert {j.config["model"]["block_types"][1][1] for j in jobs if j.config["model"]["model_type"] == "description"} == {
        "R=0.01", "R=0.10", "R=0.50"}

    uniform = GridSpec.model_validate(yaml.safe_load((examples / "seed000_uniform.yaml").read_text()))
    jobs = expand(uniform)
    assert len(jobs) == 50 and len({j.key for j in jobs}) == 50
    validate_jobs(uniform, jobs, trainers.validate_config)
    from worker.trainers.iterativenn.sampling import with_hidden
    from worker.trainers.sparse_rnn import Config

    for job in jobs[:5]:
        desc = Config.model_validate(job.config).description(2500, 10)
        h = desc.sizes[1]
        step = with_hidden(desc, h + 1).expected_trainable() - desc.expected_trainable()  # one more unit
        assert abs(desc.expected_trainable() - 50_000) <= step / 2 + 1  # the budget set the hidden size
        assert len({str(t) for row in job.config["block_types"][1:] for t in row}) > 1  # per-block draws
