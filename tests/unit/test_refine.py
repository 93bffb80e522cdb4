"""`gridfleet refine`'s pure part (scheduler/refine.py): what is chosen and the grid spec it writes."""
from __future__ import annotations

import pytest

from scheduler.refine import RefineError, choose, parse_sets, parse_top, refined_spec
from scheduler.spec import GridSpec, expand


def rows(losses: list[float | None]) -> list[dict]:
    out = []
    for i, loss in enumerate(losses):
        config = {"n_layers": 1 + i % 3, "state_size": 256, "use_residual": i % 2 == 0, "steps": 10000}
        out.append({"job_id": i + 1, "state": "succeeded" if loss is not None else "queued", "seed": 0,
                    "config": config, "result": {"min_loss": loss} if loss is not None else None})
    return out


PARENT = {"name": "seed-001", "spec": {"name": "seed-001", "trainer": "gated_rnn", "objective": "min:min_loss",
                                       "seeds": [0], "priority": 3, "config": {}, "axes": {"n_layers": [1, 2, 3]}}}


def test_parse_top_and_sets():
    assert parse_top("10%") == ("percent", 10.0) and parse_top("7") == ("count", 7)
    for bad in ("0%", "150%", "0", "ten", "-3"):
        with pytest.raises(RefineError, match="--top"):
            parse_top(bad)
    assert parse_sets(["state_size=512", "use_residual=false", "lr=1e-3", "corpus=/data/enwik8", "xs=[1, 2]"]) == {
        "state_size": 512, "use_residual": False, "lr": 1e-3, "corpus": "/data/enwik8", "xs": [1, 2]}
    with pytest.raises(RefineError, match="KEY=VALUE"):
        parse_sets(["state_size"])


def test_choose_takes_the_best_percent_rounded_down_as_the_seed_did():
    results = rows([2.0, 1.5, None, 1.9, 3.0, 1.6, 2.2, 2.4, 2.6, 2.8, 1.7, 1.8])  # 11 finished
    assert [r["job_id"] for r in choose(results, "min:min_loss", ("percent", 10.0))] == [2]  # int(11 * 0.1) = 1
    assert [r["job_id"] for r in choose(results, "min:min_loss", ("percent", 30.0))] == [2, 6, 11]
    assert [r["job_id"] for r in choose(results, "max:min_loss", ("count", 2))] == [5, 10]
    assert len(choose(results, "min:min_loss", ("percent", 1.0))) == 1  # at least one
    with pytest.raises(RefineError, match="no finished job has a value for 'min_loss'"):
        choose(rows([None, None]), "min:min_loss", ("percent", 10.0))
    with pytest.raises(RefineError, match="no finished job has a value for 'acc'"):
        choose(results, "max:acc", ("count", 1))


def test_refined_spec_expands_to_the_chosen_configs_changed_and_names_its_parent():
    chosen = choose(rows([1.0, 1.1, 1.2, 5.0]), "min:min_loss", ("count", 3))
    spec = refined_spec(PARENT, chosen, {"state_size": 512, "steps": 50000})
    assert spec["parent"] == "seed-001" and spec["priority"] == 3 and spec["objective"] == "min:min_loss"
    assert spec["config"] == {"state_size": 512, "steps": 50000}  # what they share
    grid = GridSpec.model_validate(spec)
    configs = [j.config for j in expand(grid)]
    assert configs == [{**r["config"], "state_size": 512, "steps": 50000} for r in chosen]
    assert refined_spec(PARENT, chosen, {"state_size": 512, "steps": 50000})["name"] == spec["name"]  # again: same
    assert refined_spec(PARENT, chosen, {"state_size": 1024})["name"] != spec["name"]
    assert refined_spec(PARENT, chosen, {"n_layers": 3}, name="big")["name"] == "big"


def test_configs_that_become_equal_are_one_job():
    chosen = choose(rows([1.0, 1.1, 1.2]), "min:min_loss", ("count", 3))  # n_layers 1, 2, 3
    spec = refined_spec(PARENT, chosen, {"n_layers": 3, "use_residual": True})
    assert "zip" not in spec and len(expand(GridSpec.model_validate(spec))) == 1


def test_refine_refuses_what_it_cannot_express():
    chosen = choose(rows([1.0, 1.1]), "min:min_loss", ("count", 2))
    chosen[1]["config"]["extra"] = 1
    with pytest.raises(RefineError, match="key 'extra' is set in some"):
        refined_spec(PARENT, chosen, {"state_size": 512})
    with pytest.raises(RefineError, match="--set steps.x"):
        refined_spec(PARENT, chosen, {"steps.x": 1})
    with pytest.raises(RefineError, match="objective"):
        choose(chosen, "loss", ("count", 1))
