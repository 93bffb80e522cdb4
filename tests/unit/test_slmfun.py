"""Reading seed 001's rnn_configs.json and results_01_all files (worker/trainers/slmfun.py) into an import."""
from __future__ import annotations

import json

import pytest

from scheduler.spec import GridSpec, expand, job_key
from tests.seed001_files import REAL_CONFIG, REAL_ID, seed_configs, write_configs, write_result
from worker import trainers
from worker.trainers import gated_rnn, slmfun

GRID = {"name": "seed-001", "trainer": "gated_rnn", "objective": "min:min_loss",
        "config": {"batch_size": 256, "history": 1000, "steps": 10000, "steps_mode": "finish_window",
                   "corpus": "/data/enwik8.txt"},
        "axes": {"use_input_gate": [True, False], "n_layers": [1, 2, 3]}}


def parse(config):
    return trainers.parse_config("gated_rnn", config)


def body(grid, configs, results, log_every=slmfun.SEED_LOG_EVERY):
    return slmfun.import_body(grid, configs, results, parse, gated_rnn.dataset_name, log_every)


def test_the_seeds_config_id_is_its_serialisation_of_the_nine_keys():
    assert slmfun.seed_config_id(REAL_CONFIG) == REAL_ID
    assert len({c["id"] for c in seed_configs()}) == 432
    with pytest.raises(ValueError, match="exactly"):
        slmfun.seed_config_id({**REAL_CONFIG, "steps": 1})


def test_read_configs_checks_each_id(tmp_path):
    configs = seed_configs()
    assert slmfun.read_configs(write_configs(tmp_path, configs)) == [
        {k: c[k] for k in slmfun.RNN_KEYS} for c in configs]
    bad = [dict(c) for c in configs[:3]]
    bad[1]["state_size"] = 512  # edited after the id was made
    with pytest.raises(slmfun.SeedFileError, match="entry 1: id .* is not the sha256"):
        slmfun.read_configs(write_configs(tmp_path, bad))
    stage2 = [{**configs[0], "old id": configs[0]["id"]}]
    with pytest.raises(slmfun.SeedFileError, match="'old id'"):
        slmfun.read_configs(write_configs(tmp_path, stage2))
    with pytest.raises(slmfun.SeedFileError, match="missing 'use_residual'"):
        slmfun.read_configs(write_configs(tmp_path, [{k: v for k, v in configs[0].items() if k != "use_residual"}]))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(slmfun.SeedFileError, match="not valid JSON"):
        slmfun.read_configs(tmp_path / "x.json")


def test_read_results_keeps_finished_runs_and_lists_claims(tmp_path):
    configs = seed_configs()
    done = write_result(tmp_path / "results_01_all", configs[0], 1.7)
    claim = write_result(tmp_path / "results_01_all", configs[1], 0.0, finished=False)
    finished, claims = slmfun.read_results([tmp_path / "results_01_all"])
    assert [r.path for r in finished] == [done] and claims == [claim]
    broken = write_result(tmp_path / "other", configs[2], 1.9, **{"batch size": "256"})
    with pytest.raises(slmfun.SeedFileError, match="'batch size' must be a positive integer"):
        slmfun.read_results([broken])
    with pytest.raises(slmfun.SeedFileError, match="no such file"):
        slmfun.read_results([tmp_path / "missing"])


def test_a_seed_result_becomes_our_result_with_its_219_points(tmp_path):
    [seed], _ = slmfun.read_results([write_result(tmp_path, seed_configs()[0], 1.62, start=1000.0)])
    result = slmfun.to_result(seed)
    assert result["steps"] == 10_989 and result["steps_asked"] == 10_000 and result["steps_mode"] == "finish_window"
    assert [s for s, _ in result["loss_curve"]] == list(range(50, 10_951, 50))
    assert result["min_loss"] == pytest.approx(1.62)
    assert (result["start_time"], result["end_time"], result["seconds"]) == (1000.0, 2800.5, 1800.5)
    assert (result["batch_size"], result["history_size"], result["dataset"]) == (256, 1000, "enwik8")
    # The seed's later stage logged every 100 steps: the points say the log interval does not fit.
    [other], _ = slmfun.read_results([write_result(tmp_path / "b", seed_configs()[1], 1.6, points=109)])
    with pytest.raises(slmfun.SeedFileError, match="has 109 points.*--log-every"):
        slmfun.to_result(other)


def test_import_body_is_a_grid_of_the_seeds_configs_with_the_done_ones(tmp_path):
    configs = seed_configs()
    rnn = slmfun.read_configs(write_configs(tmp_path, configs))
    finished, _ = slmfun.read_results([write_result(tmp_path / "r", configs[5], 1.7),
                                       write_result(tmp_path / "r", configs[9], 1.9)])
    out = body({**GRID, "axes": {}}, rnn, finished)
    spec = GridSpec.model_validate(out["grid"])
    jobs = expand(spec)
    assert len(jobs) == 432 and not spec.axes
    keys = {j.key for j in jobs}
    assert {job_key("gated_rnn", d["config"], d["seed"]) for d in out["done"]} <= keys
    assert [gated_rnn.external_id(parse(d["config"])) for d in out["done"]] == [configs[5]["id"], configs[9]["id"]]
    # The same jobs as the example grid expands (same base config): importing and submitting agree.
    example = GridSpec.model_validate({**GRID, "axes": {k: [True, False] for k in slmfun.FLAG_KEYS} | {
        "n_layers": [1, 2, 3], "state_size": [32, 256]}, "exclude": [
        {"use_new_state": False, "use_old_state": False}, {"state_size": 32, "use_residual": False}]})
    assert {j.key for j in expand(example)} == keys


@pytest.mark.parametrize("change, message", [
    ({"batch size": 128}, "'batch size' is 128 but the grid's config has batch_size 256"),
    ({"dataset": "text8"}, "'dataset' is 'text8' but the grid's config has corpus 'enwik8'"),
    ({"training steps": 5000}, "'training steps' is 5000"),
])
def test_import_refuses_a_result_trained_otherwise_than_the_grid(tmp_path, change, message):
    configs = seed_configs()
    points = 119 if "training steps" in change else 219  # 5,000 asked run to 5,994 = 119 points
    finished, _ = slmfun.read_results([write_result(tmp_path, configs[0], 1.7, points=points, **change)])
    with pytest.raises(slmfun.SeedFileError, match=message):
        body({**GRID, "axes": {}}, [{k: c[k] for k in slmfun.RNN_KEYS} for c in configs], finished)


def test_import_refuses_what_would_not_be_the_seeds_run(tmp_path):
    configs = seed_configs()
    rnn = [{k: c[k] for k in slmfun.RNN_KEYS} for c in configs]
    finished, _ = slmfun.read_results([write_result(tmp_path, configs[0], 1.7)])
    exact = {**GRID, "axes": {}, "config": {**GRID["config"], "steps_mode": "exact"}}
    with pytest.raises(slmfun.SeedFileError, match="steps_mode: finish_window"):
        body(exact, rnn, finished)
    with pytest.raises(slmfun.SeedFileError, match="one seed"):
        body({**GRID, "axes": {}, "seeds": [0, 1]}, rnn, finished)
    with pytest.raises(slmfun.SeedFileError, match=r"sweeps \['lr'\]"):
        body({**GRID, "axes": {"lr": [0.1, 0.01]}}, rnn, finished)
    stray = {**configs[0], "n_layers": 7}
    stray["id"] = slmfun.seed_config_id({k: stray[k] for k in slmfun.RNN_KEYS})
    unknown, _ = slmfun.read_results([write_result(tmp_path / "x", stray, 1.7)])
    with pytest.raises(slmfun.SeedFileError, match="not in the configs file"):
        body({**GRID, "axes": {}}, rnn, unknown)
    assert json.dumps(body({**GRID, "axes": {}}, rnn, finished))  # plain JSON for the API


def test_the_example_grid_is_the_seeds_432_configs_by_their_ids_and_run_length():
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "seed001_grid.yaml").read_text())
    jobs = expand(GridSpec.model_validate(data))
    ids = [trainers.external_id("gated_rnn", j.config) for j in jobs]
    assert sorted(ids) == sorted(c["id"] for c in seed_configs())
    cfg = parse(jobs[0].config)
    assert (cfg.steps_mode, cfg.end_step, cfg.end_step // cfg.log_every) == ("finish_window", 10_989, 219)
