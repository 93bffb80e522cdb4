"""Seed 004's dynamics analysis (worker/trainers/rnn_dynamics, `gridfleet analyze`): the fixed-point finder on
hand-built networks with known answers, CKA/SVCCA, the distances and groupings, and the command end to end
on a tiny grid trained by the real trainer through the real queue."""
from __future__ import annotations

import json
import math
from pathlib import Path

import harness  # tests/trainers/harness.py
import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from typer.testing import CliRunner

from worker.trainers import learning_rules
from worker.trainers.rnn_dynamics import fixed_points, geometry
from worker.trainers.rnn_dynamics.network import BadNetwork, Network


def net_of(J_rec, J_in=None, b=None, dt=0.1, dynamics="tanh") -> Network:
    J_rec = np.asarray(J_rec, dtype=np.float64)
    H = J_rec.shape[0]
    return Network.from_matrices({"J_in": np.zeros((H, 1)) if J_in is None else np.asarray(J_in, dtype=np.float64),
                                  "J_rec": J_rec, "J_out": np.ones((1, H)) / H,
                                  "b": np.zeros(H) if b is None else np.asarray(b, dtype=np.float64)},
                                 dt=dt, dynamics=dynamics)


def grid_starts(low: float, high: float, n: int, dims: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(low, high, (n, dims))


# ---- the fixed-point finder ------------------------------------------------------------------------
def test_finder_recovers_the_nine_fixed_points_of_two_self_exciting_units_and_their_stability():
    # h_i = 2 tanh(h_i) for each unit: 0 (unstable) and +-h* per unit, so 9 fixed points: the 4 corners
    # stable, the 4 edge points saddles (1 unstable direction), the origin a source (2)
    h_star = brentq(lambda h: 2 * math.tanh(h) - h, 0.5, 5.0)
    net = net_of(2 * np.eye(2), J_in=[[1.0], [0.0]])
    found = fixed_points.find(net, ["u=0", "u=1"], np.array([[0.0], [1.0]]), grid_starts(-3, 3, 200, 2))
    zero, pushed = found
    assert zero.counts == {"stable": 4, "saddle": 4, "unstable": 1, "slow": 0}
    expected = {(a * h_star, c * h_star): (abs(a) + abs(c) == 1, abs(a) + abs(c))
                for a in (-1, 0, 1) for c in (-1, 0, 1)}
    for (x, y), (_, nonzero) in expected.items():
        matches = [p for p in zero.fixed if np.allclose(p.state, [x, y], atol=1e-8)]
        assert len(matches) == 1, (x, y)
        assert matches[0].unstable_dims == 2 - nonzero  # each unit at 0 adds an unstable direction
        assert matches[0].kind == {0: "stable", 1: "saddle", 2: "unstable"}[2 - nonzero]
        assert matches[0].fixed and matches[0].q < 1e-20
    # an input of 1 on unit 1 leaves one root h1 = 2 tanh(h1) + 1: two stable points and one saddle
    h1 = brentq(lambda h: 2 * math.tanh(h) + 1 - h, 0.5, 5.0)
    assert pushed.counts == {"stable": 2, "saddle": 1, "unstable": 0, "slow": 0}
    by_kind = {tuple(np.round(p.state, 6)): p.kind for p in pushed.fixed}
    assert by_kind == {(round(h1, 6), round(h_star, 6)): "stable", (round(h1, 6), round(-h_star, 6)): "stable",
                       (round(h1, 6), 0.0): "saddle"}


def test_a_slow_point_is_kept_apart_from_the_fixed_points():
    # h = 2 tanh(h) + b: just past the saddle-node (b_c = 0.5328), the pair near h = -0.88 has become a
    # ghost, a minimum of q > 0; one stable fixed point remains near h = 2.5
    net = net_of([[2.0]], b=[0.54])
    (condition,) = fixed_points.find(net, ["u=0"], np.zeros((1, 1)), grid_starts(-3, 3, 100, 1))
    root = brentq(lambda h: 2 * math.tanh(h) + 0.54 - h, 1.0, 5.0)
    assert [p.kind for p in condition.fixed] == ["stable"]
    assert condition.fixed[0].state[0] == pytest.approx(root, abs=1e-9)
    assert len(condition.slow) == 1 and not condition.slow[0].fixed
    assert condition.slow[0].state[0] == pytest.approx(-math.acosh(math.sqrt(2)), abs=0.02)  # v' = 0 there
    assert 1e-12 < condition.slow[0].q < 1e-6


@pytest.mark.parametrize("dynamics", ["tanh", "seed"])
def test_the_networks_step_and_output_are_the_trainers_forward(dynamics):
    cfg = learning_rules.Config.model_validate({"rule": "bptt", "hidden_size": 6, "dynamics": dynamics})
    gen = torch.Generator().manual_seed(3)
    params = learning_rules.init_network(cfg, gen)
    params["b"] = torch.randn(1, 6, generator=gen)
    inputs, _ = learning_rules.make_trials(cfg.model_copy(update={"trial_length": 5}), 4, gen)
    h0 = learning_rules.initial_states(cfg, 4, gen)
    out, states = learning_rules.run(params, inputs, h0, cfg.dt, dynamics, keep_states=True)
    net = Network.from_matrices({k: v[0].numpy() for k, v in params.items()}, dt=cfg.dt, dynamics=dynamics)
    ours, ours_out = net.trajectories(inputs, h0)
    torch.testing.assert_close(ours.float(), states[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_out.float(), out[:, 0], rtol=1e-5, atol=1e-5)


def test_the_closed_form_jacobians_match_autograd():
    gen = torch.Generator().manual_seed(0)
    net = net_of(torch.randn(5, 5, generator=gen).numpy(), J_in=torch.randn(5, 2, generator=gen).numpy())
    h, u = torch.randn(5, generator=gen, dtype=torch.float64), torch.tensor([0.3, -1.0], dtype=torch.float64)
    numeric = torch.autograd.functional.jacobian(lambda x: net.step(x, u), h)
    torch.testing.assert_close(net.map_jacobian(h), numeric)
    torch.testing.assert_close(net.velocity_jacobian(h), (numeric - torch.eye(5, dtype=torch.float64)) / net.dt)
    states = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    fixed_points.q_value(net, states, u).sum().backward()
    torch.testing.assert_close(fixed_points.q_gradient(net, states.detach(), u), states.grad)


def test_conditions_are_each_context_with_its_own_signal_at_each_level():
    labels, inputs = fixed_points.conditions(4, 2, levels=(-0.2, 0.0, 0.2))
    assert labels == ["ctx1 -0.2", "ctx1 +0", "ctx1 +0.2", "ctx2 -0.2", "ctx2 +0", "ctx2 +0.2"]
    np.testing.assert_array_equal(inputs[2], [0.2, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(inputs[3], [0.0, -0.2, 0.0, 1.0])
    assert fixed_points.conditions(1, 0, levels=(0.1,), rdm=True)[1].tolist() == [[0.1]]
    with pytest.raises(ValueError, match="2 contexts has 4 inputs, this one has 3"):
        fixed_points.conditions(3, 2)


def test_bad_matrices_are_refused_naming_the_problem():
    with pytest.raises(BadNetwork, match="lack b"):
        Network.from_matrices({"J_in": np.zeros((2, 1)), "J_rec": np.zeros((2, 2)), "J_out": np.zeros((1, 2))}, dt=0.1)
    with pytest.raises(BadNetwork, match=r"J_out has shape \(2, 2\)"):
        Network.from_matrices({"J_in": np.zeros((2, 1)), "J_rec": np.zeros((2, 2)), "J_out": np.zeros((2, 2)),
                               "b": np.zeros(2)}, dt=0.1)


# ---- geometry -------------------------------------------------------------------------------------
def trajectories_of(seed: int, units: int = 30, g: float = 1.5, input_scale: float = 1.0,
                    start_scale: float = 0.0) -> np.ndarray:
    """States [T*B, H] of a random tanh network driven by the CDI task's inputs (the same trials every seed)."""
    gen = torch.Generator().manual_seed(seed)
    net = net_of(g / math.sqrt(units) * torch.randn(units, units, generator=gen).numpy(),
                 J_in=input_scale * torch.randn(units, 4, generator=gen).numpy())
    cfg = learning_rules.Config.model_validate({"rule": "bptt", "trial_length": 40, "hidden_size": units})
    inputs, _ = learning_rules.make_trials(cfg, 32, torch.Generator().manual_seed(99), dtype=torch.float64)
    h0 = start_scale * torch.randn(32, units, generator=gen, dtype=torch.float64)
    states, _ = net.trajectories(inputs, h0)
    return states.reshape(-1, units).numpy()


def test_cka_and_svcca_of_a_network_with_itself_are_one_and_with_a_random_one_low():
    x = trajectories_of(0)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(30, 30)))
    noise = np.random.default_rng(2).normal(size=x.shape)
    for similarity in (geometry.linear_cka, geometry.svcca):
        assert similarity(x, x) == pytest.approx(1.0, abs=1e-9)
        assert similarity(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0, abs=1e-9)  # basis, scale, offset
    # random activity: CKA ~ 0; SVCCA's chance level is ~ sqrt(dims / samples) (20 of 1280 here)
    assert geometry.linear_cka(x, noise) < 0.02 and geometry.svcca(x, noise) < 0.15
    # two random chaotic networks (g = 3, weak input, own starts) on the same trials share little
    chaotic, other = (trajectories_of(s, g=3.0, input_scale=0.1, start_scale=1.0) for s in (0, 1))
    assert geometry.linear_cka(chaotic, chaotic) == pytest.approx(1.0)
    assert geometry.linear_cka(chaotic, other) < 0.15 and geometry.svcca(chaotic, other) < 0.5
    with pytest.raises(ValueError, match="same samples"):
        geometry.linear_cka(x, x[:-1])


def test_distances_and_grouping_by_rule():
    signatures = [geometry.topology_signature([{"stable": 2, "saddle": 1, "unstable": 0}]),
                  geometry.topology_signature([{"stable": 1, "saddle": 0, "unstable": 0}])]
    np.testing.assert_array_equal(geometry.topology_distances(signatures), [[0, 2], [2, 0]])
    points = np.array([[0, 0], [0.1, 0], [0, 0.1], [5, 5], [5.1, 5], [5, 5.1]])
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    good = geometry.grouping(distance, ["bptt"] * 3 + ["ga"] * 3)
    assert good["nearest_same"] == 1.0 and good["silhouette"] > 0.9
    mixed = geometry.grouping(distance, ["bptt", "ga"] * 3)
    assert mixed["nearest_same"] < 0.5 and mixed["silhouette"] < 0
    assert geometry.grouping(distance, ["bptt"] * 6)["silhouette"] is None
    coords = geometry.classical_mds(distance)
    np.testing.assert_allclose(np.linalg.norm(coords[:, None] - coords[None], axis=-1), distance, atol=1e-9)


def random_model(job_id: int, rule: str, units: int = 8, **config):
    from worker.trainers.rnn_dynamics.models import Model

    cfg = learning_rules.Config.model_validate({"rule": rule, "hidden_size": units, "trial_length": 15, **config})
    params = learning_rules.init_network(cfg, torch.Generator().manual_seed(job_id))
    network = Network.from_matrices({k: v[0].numpy() for k, v in params.items()}, dt=cfg.dt)
    return Model(job_id, 0, cfg, None, network, "matrices.npz")


def test_an_rdm_grid_is_analysed_on_its_one_input_and_unlike_models_are_refused(tmp_path):
    from worker.trainers.rnn_dynamics import report

    options = report.Options(trials=4, starts=8, iterations=50, levels=(-0.1, 0.1))
    models = [random_model(1, "bptt", rdm=True), random_model(2, "ga", rdm=True)]
    summary = report.analyze(models, options, tmp_path / "rdm")
    assert summary["conditions"] == ["-0.1", "+0.1"]
    assert [len(m["conditions"]) for m in summary["models"]] == [2, 2]
    assert (tmp_path / "rdm" / "model-2.png").is_file()
    with pytest.raises(ValueError, match="job 3 .*12 units.* cannot be compared with job 1"):
        report.analyze([models[0], random_model(3, "ga", units=12, rdm=True)], options, tmp_path / "bad")
    with pytest.raises(ValueError, match="need 0 < fixed_tol <= slow_tol"):
        report.Options(fixed_tol=1e-3, slow_tol=1e-6)


def test_a_job_whose_matrices_cannot_be_found_is_named_with_the_reason(tmp_path):
    from common.checkpoints import StoreOptions
    from worker.trainers.rnn_dynamics.models import NoModels, load_models

    gone = {"job_id": 9, "state": "succeeded", "seed": 0, "config": {"rule": "bptt"},
            "result": {"matrices": str(tmp_path / "gone.npz")}, "checkpoint": None}
    lost = {**gone, "job_id": 10, "checkpoint": {"uri": f"local:{tmp_path / 'ckpt-000000000004.pt'}", "step": 4}}
    queued = {**gone, "job_id": 11, "state": "queued"}
    with pytest.raises(NoModels) as refused:
        load_models("learning_rules", [gone, lost, queued], tmp_path, StoreOptions())
    assert "job 9: FileNotFoundError" in str(refused.value) and "recorded no checkpoint" in str(refused.value)
    assert "job 10: FileNotFoundError" in str(refused.value) and "job 11" not in str(refused.value)
    with pytest.raises(NoModels, match="job states: queued"):
        load_models("learning_rules", [queued], tmp_path, StoreOptions())


# ---- `gridfleet analyze` on a tiny real grid ---------------------------------------------------------
TINY = {"--N": 2, "hidden_size": 12, "trial_length": 20, "batch_size": 16, "validation_trials": 20,
        "max_steps": 4, "lr": 0.01, "trainable": ["J_in", "J_rec", "J_out"], "population": 6, "parents": 2,
        "ff_error_trigger": 5, "ff_alpha": 100, "log_every": 2}
ANALYSIS = ["--trials", "8", "--starts", "24", "--iterations", "150"]


def train_tiny_grid(home, name: str = "tiny-004", trainer: str = "learning_rules", config=None, axes=None):
    """Submit a grid to a SQLite queue in `home` and run every job in this process with the real trainer and
    context: claim, train, record the final checkpoint, finish (what an agent does, minus the child)."""
    from common.db import make_engine, migrate
    from scheduler.grids import submit_grid
    from scheduler.policy import RetryPolicy
    from scheduler.queue import Queue
    from scheduler.spec import GridSpec
    from worker import trainers

    url = f"sqlite:///{home}/gridfleet.db"
    home.mkdir(parents=True, exist_ok=True)
    migrate(url)
    engine = make_engine(url)
    spec = GridSpec.model_validate({"name": name, "trainer": trainer, "config": TINY if config is None else config,
                                    "axes": {"rule": ["bptt", "ga", "ff"]} if axes is None else axes, "seeds": [0, 1]})
    submit_grid(engine, spec, trainers.validate_config)
    queue = Queue(engine, RetryPolicy())
    worker = queue.register_worker("test", "here", [trainer])
    jobs = []
    while (job := queue.claim(worker)) is not None:
        run = harness.Harness(home / f"job-{job.id}", seed=job.seed, job_id=job.id)
        result = run.train(trainers.load(trainer), job.config)
        if run.checkpoints:
            queue.set_checkpoint(job.id, job.attempt_id, run.checkpoints[-1], worker_id=worker)
        queue.finish(job.id, job.attempt_id, "succeeded", result=result, worker_id=worker)
        jobs.append((job.id, result))
    engine.dispose()
    return url, jobs


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
    """6 tiny jobs (3 rules x 2 seeds) trained for real; job 1's matrices.npz removed, as if it had been trained
    on another machine, so the analysis must read its matrices from the final checkpoint."""
    home = tmp_path_factory.mktemp("tiny") / "home"
    url, jobs = train_tiny_grid(home)
    assert len(jobs) == 6 and all("matrices" in result for _, result in jobs)
    moved = Path(jobs[0][1]["matrices"])
    with np.load(moved) as saved:
        saved_rec = saved["J_rec"].copy()
    moved.unlink()
    return home, url, sorted(job_id for job_id, _ in jobs), saved_rec


def test_analyze_writes_pngs_and_a_summary_that_matches_the_finder(tiny_grid, tmp_path, monkeypatch):
    from matplotlib.image import imread

    from common.checkpoints import StoreOptions
    from cli.main import app
    from common.db import make_engine
    from scheduler.reports import grid_results
    from worker.trainers.rnn_dynamics import report
    from worker.trainers.rnn_dynamics.models import load_models

    home, url, job_ids, saved_rec = tiny_grid
    monkeypatch.setenv("GRIDFLEET_HOME", str(home))
    out = tmp_path / "analysis"
    result = CliRunner().invoke(app, ["analyze", "tiny-004", "--db", url, "--out", str(out), *ANALYSIS])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [m["job_id"] for m in summary["models"]] == job_ids
    assert sorted(p.name for p in out.glob("model-*.png")) == sorted(f"model-{j}.png" for j in job_ids)
    for png in ["distances.png", "clusters.png", *(f"model-{j}.png" for j in job_ids)]:
        assert imread(out / png).ndim == 3
    for key in ("topology", "cka", "svcca"):
        assert np.array(summary["distances"][key]).shape == (6, 6)
    assert {m["rule"] for m in summary["models"]} == {"bptt", "ga", "ff"}
    assert summary["models"][0]["source"] == "checkpoint" and summary["models"][1]["source"] == "matrices.npz"
    # the summary's numbers are what the finder returns for those networks with the same options
    engine = make_engine(url)
    models, problems = load_models("learning_rules", grid_results(engine, "tiny-004"), home / "checkpoints",
                                   StoreOptions())
    engine.dispose()
    assert problems == []
    np.testing.assert_allclose(models[0].network.J_rec.numpy(), saved_rec, rtol=0, atol=1e-7)
    options = report.Options(trials=8, starts=24, iterations=150)
    inputs, targets, h0 = report.shared_trials(models, options)
    labels, conditions = fixed_points.conditions(4, 2, options.levels)
    for model, entry in zip(models, summary["models"]):
        direct, _, found = report.analyze_model(model, inputs, targets, h0, labels, conditions, options)
        assert [c.counts for c in found] == [{k: c[k] for k in ("stable", "saddle", "unstable", "slow")}
                                             for c in entry["conditions"]]
        assert direct["accuracy"] == entry["accuracy"]
        for condition, saved_condition in zip(found, entry["conditions"]):
            for point, saved_point in zip(condition.fixed, saved_condition["fixed_points"]):
                np.testing.assert_allclose(point.state, saved_point["state"], atol=1e-6)
    # the table names every model, with its stable/saddle counts per condition
    first = summary["models"][1]["conditions"][0]
    assert f"{first['stable']}/{first['saddle']}" in result.output
    assert "ctx1" in result.output and "ctx2" in result.output and "silhouette" in result.output
    csv_lines = (out / "summary.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 6 * 6  # a header, then a row per model and condition


def test_analyze_reads_the_grid_from_the_api_as_from_the_database(tiny_grid, tmp_path, monkeypatch):
    import secrets
    import threading
    import time

    import uvicorn
    from pydantic import SecretStr

    from api.app import create_app
    from cli.main import app
    from common.settings import Settings

    home, url, job_ids, _ = tiny_grid
    monkeypatch.setenv("GRIDFLEET_HOME", str(home))
    admin = "gf_test_admin_" + secrets.token_hex(16)
    api = create_app(Settings(_env_file=None, database_url=url, admin_token=SecretStr(admin), home=home))
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the API server did not start"
            time.sleep(0.02)
        address = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        runner = CliRunner()
        by_api = runner.invoke(app, ["analyze", "tiny-004", "--server", address, "--token", admin,
                                     "--out", str(tmp_path / "api"), *ANALYSIS])
        by_db = runner.invoke(app, ["analyze", "tiny-004", "--db", url, "--out", str(tmp_path / "db"), *ANALYSIS])
        refused = runner.invoke(app, ["analyze", "tiny-004", "--server", address, "--token", "wrong"])
    finally:
        server.should_exit = True
        thread.join(10)
    assert by_api.exit_code == 0 and by_db.exit_code == 0, by_api.output + by_db.output
    from_api, from_db = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("api", "db"))
    assert [m["job_id"] for m in from_api["models"]] == job_ids
    assert from_api["models"] == from_db["models"] and from_api["distances"] == from_db["distances"]
    assert refused.exit_code == 1 and "401" in refused.output


def test_analyze_refuses_bad_input_with_a_message(tmp_path, monkeypatch):
    from cli.main import app

    monkeypatch.setenv("GRIDFLEET_HOME", str(tmp_path / "home"))
    url, _ = train_tiny_grid(tmp_path / "home", name="noop-grid", trainer="noop", config={}, axes={"value": [1.0]})
    runner = CliRunner()
    missing = runner.invoke(app, ["analyze", "nope", "--db", url])
    assert missing.exit_code == 1 and "nope" in missing.output
    wrong = runner.invoke(app, ["analyze", "noop-grid", "--db", url])
    assert wrong.exit_code == 1 and "trainer is 'noop'" in wrong.output
    levels = runner.invoke(app, ["analyze", "noop-grid", "--db", url, "--levels", "a,b"])
    assert levels.exit_code == 2 and "--levels" in levels.output
    both = runner.invoke(app, ["analyze", "noop-grid", "--db", url, "--server", "http://x"])
    assert both.exit_code == 2 and "not both" in both.output
