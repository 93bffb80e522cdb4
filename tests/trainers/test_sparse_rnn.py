"""sparse_rnn (seed 000) on tiny CPU runs, with a real TrainerContext, Pipe, Event and LocalStore.

RandomAnomaly here is the offline task (scikit-learn digits) at 6x6 images, plus tiny parquet files in the
real format; part B's tests add the Minari source."""
from __future__ import annotations

import harness  # tests/trainers/harness.py
import pytest
import torch

from worker import trainers
from worker.trainers import sparse_rnn
from worker.trainers.iterativenn import anomaly
from worker.trainers.iterativenn.data import IGNORE
from worker.trainers.sparse_rnn import Config


class Harness(harness.Harness):
    def train(self, **config) -> dict:
        return super().train(sparse_rnn, config)


def small(**overrides) -> dict:
    config = {"hidden_size": 16, "learning_rate": 3e-3, "max_epochs": 12, "log_every": 4, "density": 0.5,
              "data": {"dataset": "random_anomaly", "image_size": 6, "train_size": 32, "validation_size": 8,
                       "test_size": 8, "batch_size": 8}}
    config.update(overrides)
    return config


def losses(h: Harness) -> list[float]:
    return [values["loss"] for _step, values in h.reports if "loss" in values]


# ---- (a) every model type learns on RandomAnomaly ------------------------------------------------------
@pytest.mark.parametrize("model_type, extra", [
    ("description", {"representation": "dense", "learning_rate": 1e-2}),
    ("block", {"representation": "sparse", "density": 0.3, "learning_rate": 1e-2}),  # an alias; the CSR path
    ("LSTM", {}), ("gru", {}), ("rnn", {}), ("MLP", {}),
])
def test_each_model_type_learns_on_random_anomaly(tmp_path, model_type, extra):
    h = Harness(tmp_path)
    result = h.train(**small(model_type=model_type, **extra))
    curve = losses(h)
    assert len(curve) == 12  # 4 batches x 12 epochs / log_every 4
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < first - 0.15, curve  # fits the 32 training sequences: clearly below ln(10) = 2.30
    assert result["steps"] == 48 and result["epochs"] == 12
    assert result["loss_kind"] == "cross_entropy" and result["sequence_position"] == "last"
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert len(result["val_curve"]) == 12 and result["min_val_loss"] == min(v for _, v in result["val_curve"])
    assert result["parameters"] > 0
    if "representation" in extra:
        assert result["representation"] == extra["representation"]


# ---- (b) checkpoint / resume of the sparse model is exact --------------------------------------------------
@pytest.mark.parametrize("representation", ["sparse", "dense"])
def test_stop_and_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path, representation):
    # 4 batches an epoch: a stop at step 6 falls mid-epoch, with a live shuffle order
    config = small(max_epochs=3, log_every=2, checkpoint_every=100, representation=representation, density=0.2)
    straight = Harness(tmp_path / "a", seed=5)
    full = straight.train(**config)

    first = Harness(tmp_path / "b", seed=5, stop_at=6)
    assert first.train(**config) == {"stopped_at": 6}
    assert [p["step"] for p in first.checkpoints] == [6]
    second = Harness(tmp_path / "b", seed=5, checkpoint=first.checkpoints[-1])
    resumed = second.train(**config)
    assert second.reports[0][0] == 8  # went on from step 6, not from 0

    a, b = (h.store.load(h.checkpoints[-1]) for h in (straight, second))
    assert a["step"] == b["step"] == 12 and a["representation"] == b["representation"] == representation
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    assert [r for r in straight.reports if r[0] <= 6] == first.reports
    assert [r for r in straight.reports if r[0] > 6] == second.reports
    for key in ("final_loss", "steps", "loss_curve", "val_curve", "test_loss", "parameters"):
        assert full[key] == resumed[key], key


# ---- (c) seed 000's config keys, as written -------------------------------------------------------------
RA_MODEL = {  # the shape of seed 000's conf/model files for RandomAnomaly
    "factory_type": "callbacks", "model_type": "description", "name": "description_sparse",
    "learning_rate": 1e-4, "row_sizes": [2500, 685, 10], "col_sizes": [2500, 685, 10], "bias": True,
    "block_types": [[0, 0, 0], ["R=0.10", "R=0.10", "R=0.10"], ["R=0.10", "R=0.10", "R=0.10"]],
    "initialization_types": [[0, 0, 0], ["G=0,0.05"] * 3, ["G=0,0.05"] * 3],
    "trainable": [[False] * 3, ["non-zero"] * 3, ["non-zero"] * 3],
    "activations": ["Identity", "ReLU", "Identity"], "activation_sizes": [2500, 685, 10],
    "callbacks": {"loss": {"func": "CrossEntropyLoss", "idx_list": "asteval::range(3185, 3195)",
                           "sequence_position": "last"},
                  "initialization": {"func": "zeros", "size": "asteval::3195"},
                  "data": {"func": "insert", "idx_list": "asteval::range(2500)", "flatten_input": True},
                  "output": {"func": "all", "idx_list": "asteval::range(3185, 3195)"}},
}
RA_DATA = {"dataset": "random_anomaly", "name": "random_anomaly", "train_size": 10000, "validation_size": 1000,
           "test_size": 1000, "batch_size": 16}
SHORT_BASE = {"max_epochs": 5, "use_cuda": True, "num_threads": 1, "log_every_n_steps": 1, "profiler": None,
              "base_dir": "default", "seed": "None"}


def test_config_accepts_seed_000_files_flat_and_as_hydra_sections(tmp_path):
    flat = Config.model_validate({**RA_MODEL, **RA_DATA, **SHORT_BASE})  # data's `name` overwrites model's
    nested = Config.model_validate({"base": SHORT_BASE, "data": RA_DATA, "model": RA_MODEL,
                                    "logger": {"project": "x"}})
    names = {"name": True, "data": {"name"}}
    assert flat.model_dump(exclude=names) == nested.model_dump(exclude=names)
    assert (nested.name, nested.data.name) == ("description_sparse", "random_anomaly")
    assert (flat.model_type, flat.learning_rate, flat.max_epochs, flat.log_every) == ("description", 1e-4, 5, 1)
    assert (flat.data.train_size, flat.data.batch_size, flat.data.is_random_anomaly) == (10000, 16, True)
    assert flat.loss_from_callbacks() == ("cross_entropy", "last")
    desc = flat.description(2500, 10)
    assert desc.sizes == [2500, 685, 10] and desc.types[1][0].arg == 0.10

    import yaml

    for name, part in (("base.yaml", SHORT_BASE), ("data.yaml", RA_DATA), ("model.yaml", RA_MODEL)):
        (tmp_path / name).write_text(yaml.safe_dump(part))
    from_files = sparse_rnn.config_from_hydra(tmp_path / "base.yaml", tmp_path / "data.yaml", tmp_path / "model.yaml")
    assert Config.model_validate(from_files) == nested
    trainers.validate_config("sparse_rnn", from_files)


def test_seed_baseline_keys_and_aliases():
    lstm = Config.model_validate({"model_type": "LSTM", "input_size": 39, "hidden_size": 300, "output_size": 28,
                                  "activations": False, "lr": 1e-3, "epochs": 2})
    assert (lstm.model_type, lstm.hidden_size, lstm.learning_rate, lstm.max_epochs) == ("lstm", 300, 1e-3, 2)
    assert Config.model_validate({"model_type": "sparse"}).model_type == "description"
    assert Config.model_validate({"model_type": "MLP", "sizes": [36, 20, 10]}).sizes == [36, 20, 10]


@pytest.mark.parametrize("config, field", [
    ({"model_type": "transformer"}, "model_type"),
    ({"block_types": [[0, 0, 0], ["R=2", "W", "W"], ["W", "W", "W"]]}, None),
    ({"initialization_types": [[0, 0, 0], ["G=0", "0", "0"], ["0", "0", "0"]]}, None),
    ({"trainable": [[False] * 3, ["maybe"] * 3, [True] * 3]}, None),
    ({"row_sizes": [4, 8, 2], "col_sizes": [4, 9, 2]}, None),
    ({"learning_rate": 0}, "learning_rate"),
    ({"use_gru": True}, "use_gru"),
    ({"batch_size": 8, "data": {"batch_size": 16}}, None),
])
def test_config_rejects_bad_values(config, field):
    with pytest.raises(trainers.InvalidConfig) as info:
        trainers.validate_config("sparse_rnn", config)
    if field:
        assert any(field in name for name, _ in info.value.errors), info.value.errors


def test_row_sizes_must_match_the_data(tmp_path):
    h = Harness(tmp_path)
    with pytest.raises(ValueError, match="row_sizes .* must start with the data's input size 36"):
        h.train(**small(row_sizes=[2500, 16, 10]))


def test_param_budget_solves_the_hidden_size(tmp_path):
    h = Harness(tmp_path)
    result = h.train(**small(param_budget=800, density=0.25, max_epochs=1))
    # expected count: 0.25 * (h*36 + h*h + h*10 + 10*36 + 10*h + 10*10) + h + 10 biases, closest to 800
    count = lambda n: 0.25 * (n * 36 + n * n + n * 10 + 360 + n * 10 + 100) + n + 10
    want = min(range(1, 200), key=lambda n: abs(count(n) - 800))
    assert result["hidden_size"] == want
    assert abs(result["parameters"] - 800) < 0.25 * 800  # the drawn network is near its expectation


# ---- (d) RandomAnomaly data ----------------------------------------------------------------------------
def test_offline_random_anomaly_has_the_seed_shape_and_is_deterministic():
    data = anomaly.build_offline(40, 5, 5, seed=3, image_size=10)
    again = anomaly.build_offline(40, 5, 5, seed=3, image_size=10)
    other = anomaly.build_offline(40, 5, 5, seed=4, image_size=10)
    assert (data.input_size, data.output_size, data.loss, data.sequence_position) == (100, 10, "cross_entropy", "last")
    labels = []
    for i in range(40):
        x, y = data.train[i]
        assert x.shape == (11, 100) and y.shape == (11,)
        assert torch.equal(x[-1], torch.zeros(100))  # the blank cue
        assert (y[:-1] == IGNORE).all() and 0 <= int(y[-1]) < 10
        labels.append(int(y[-1]))
        assert torch.equal(x, again.train[i][0])
    assert len(set(labels)) >= 5  # the anomaly's position varies
    assert any(not torch.equal(data.train[i][0], other.train[i][0]) for i in range(5))
    # nine images share one transform; the anomaly's differs, so it is the odd one out more often than not
    x, y = data.train[0]
    assert x[:10].std(dim=1).min() > 0  # real images, not blanks


def test_every_transform_changes_an_image_within_its_range():
    images, _ = anomaly._digits(12)
    img = images[5]
    gen = torch.Generator().manual_seed(0)
    base = anomaly.transform(img, "baseline", gen)
    for name in anomaly.TRANSFORMS[1:]:
        out = anomaly.transform(img, name, gen)
        assert out.shape == img.shape
        assert not torch.allclose(out, base), name
        assert out.min() >= base.min() - 1e-5 and out.max() <= base.max() + 1e-5, name


def _write_parquet(folder, stem: str, rows: int, side: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for _ in range(rows):
        anomaly_at = int(torch.randint(10, (1,), generator=gen))
        frames = torch.rand(11, side * side, generator=gen)
        frames[anomaly_at] += 2.0  # an easy anomaly: the brightest image
        frames[10] = 0
        xs.append([f.tolist() for f in frames])
        ys.append([int(k == anomaly_at) for k in range(10)] + [anomaly_at])
    pq.write_table(pa.table({"x": xs, "y": ys}), folder / f"{stem}.parquet.gzip", compression="gzip")


def test_reads_the_real_parquet_layout_and_trains_on_it(tmp_path):
    folder = tmp_path / "ra"
    folder.mkdir()
    for stem, rows, seed in (("RandomAnomaly_Train_Combined30", 24, 0), ("RandomAnomaly_Validate", 8, 1),
                             ("RandomAnomaly_Test", 8, 2)):
        _write_parquet(folder, stem, rows, 4, seed)
    data = anomaly.load(str(folder), 16, 8, 8, seed=0)
    assert (len(data.train), data.input_size, data.info["image_size"]) == (16, 16, 4)
    x, y = data.train[0]
    assert x.shape == (11, 16) and int(y[-1]) == int(x[:10].sum(dim=1).argmax())

    h = Harness(tmp_path / "run")
    result = h.train(**small(data={"dataset": "RandomAnomaly", "path": str(folder), "train_size": 16,
                                   "validation_size": 8, "test_size": 8, "batch_size": 8}, max_epochs=2))
    assert result["steps"] == 4 and result["dataset"] == "random_anomaly"
    with pytest.raises(FileNotFoundError, match="leave data.path out"):
        anomaly.load(str(tmp_path / "missing"), 1, 1, 1, seed=0)


def test_minari_jobs_pass_their_data_settings_to_the_loader(monkeypatch):
    from worker.trainers.iterativenn import minari_data

    calls = []
    monkeypatch.setattr(minari_data, "load_sequences", lambda *args, **kwargs: calls.append((args, kwargs)))
    cfg = Config.model_validate({"data": {"dataset": "D4RL/door/expert-v2", "train_size": 40, "validation_size": 5,
                                          "test_size": 5, "minari_root": "/data/minari", "download": True}})
    sparse_rnn.load_data(cfg, seed=3)
    assert calls == [(("D4RL/door/expert-v2", 40, 5, 5, 3), {"minari_root": "/data/minari", "download": True})]
    assert Config.model_validate({"data": {"dataset": "D4RL/door/expert-v2"}}).data.download is False


# ---- (e) baselines are sized like the block model beside them -------------------------------------------
@pytest.mark.parametrize("kind, n_in, hidden, n_out", [
    ("lstm", 2500, 22, 10), ("lstm", 39, 8, 28), ("lstm", 20, 10, 10), ("gru", 2500, 29, 10), ("gru", 40, 10, 10),
    ("rnn", 36, 16, 10), ("rnn", 36, 10, 10),
])
def test_baseline_parameter_counts_are_what_torch_builds(kind, n_in, hidden, n_out):
    from worker.trainers.iterativenn.baselines import baseline_parameters, build_baseline

    model = build_baseline(kind, n_in, hidden, n_out, torch.Generator())
    assert baseline_parameters(kind, n_in, hidden, n_out) == sum(p.numel() for p in model.parameters())


def test_baselines_take_their_size_from_the_block_description_beside_them():
    """The RandomAnomaly example's lstm/gru: no hidden_size, the description's row_sizes [2500, 685, 10] at
    R=0.10 (~223k parameters): each baseline gets the hidden size whose count is closest to it."""
    import yaml
    from pathlib import Path

    from worker.trainers.iterativenn.baselines import baseline_parameters

    example = yaml.safe_load((Path(__file__).parents[2] / "examples" / "seed000_random_anomaly.yaml").read_text())
    data = type("Sizes", (), {"input_size": 2500, "output_size": 10, "name": "ra"})
    description = Config.model_validate(example["config"])
    budget = description.description(2500, 10).expected_trainable()
    assert 215_000 < budget < 230_000
    for kind in ("lstm", "gru"):
        cfg = Config.model_validate({**example["config"], "model": {**example["config"]["model"], "model_type": kind}})
        _, facts = sparse_rnn.build_model(cfg, data, seed=0, device="cpu", representation=None)
        h = facts["hidden_size"]
        count = facts["trainable_parameters"]
        assert count == baseline_parameters(kind, 2500, h, 10)
        step = baseline_parameters(kind, 2500, h + 1, 10) - count  # one more unit
        assert abs(count - budget) <= step / 2 + 1, (kind, h, count, budget)
        assert h < 64  # not the old fixed 64 (643,712 / 493,322 parameters)
    # an explicit hidden_size still wins, and param_budget sets one directly
    explicit = Config.model_validate({"model_type": "lstm", "hidden_size": 11, "row_sizes": [2500, 685, 10]})
    assert sparse_rnn.build_model(explicit, data, 0, "cpu", None)[1]["hidden_size"] == 11
    budgeted = Config.model_validate({"model_type": "gru", "param_budget": 50_000})
    h = sparse_rnn.build_model(budgeted, data, 0, "cpu", None)[1]["hidden_size"]
    off = [abs(baseline_parameters("gru", 2500, k, 10) - 50_000) for k in (h - 1, h, h + 1)]
    assert off[1] == min(off)  # the closest count


# ---- (f) RandomAnomaly is read in file order unless shuffle is asked -------------------------------------
def test_random_anomaly_trains_in_file_order_unless_shuffled(tmp_path, monkeypatch):
    seen: list[list[int]] = []
    real_pad = sparse_rnn.pad

    def spy(pairs):
        seen.append([int(y[-1]) for _, y in pairs])  # the labels identify the samples
        return real_pad(pairs)

    monkeypatch.setattr(sparse_rnn, "pad", spy)
    data = anomaly.build_offline(32, 8, 8, seed=0, image_size=6)
    in_order = [int(data.train[i][1][-1]) for i in range(32)]
    Harness(tmp_path / "a").train(**small(max_epochs=1))
    assert sum(seen[:4], []) == in_order  # the first epoch's 4 training batches, as stored
    seen.clear()
    shuffled = small(max_epochs=1)
    shuffled["data"] = {**shuffled["data"], "shuffle": True}
    Harness(tmp_path / "b").train(**shuffled)
    assert sorted(sum(seen[:4], [])) == sorted(in_order) and sum(seen[:4], []) != in_order
