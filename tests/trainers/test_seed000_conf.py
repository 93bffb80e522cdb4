"""Seed 000's own Hydra files (a sample copied into seed000_conf/, see its README) through sparse_rnn's
converter: each loads and builds its model, a few train two steps, and each refused one says why."""
from __future__ import annotations

import re
from pathlib import Path

import harness  # tests/trainers/harness.py
import pytest
import torch
import yaml

from worker import trainers
from worker.trainers import sparse_rnn
from worker.trainers.iterativenn.baselines import ReadUnits
from worker.trainers.iterativenn.blocks import BlockRNN
from worker.trainers.sparse_rnn import Config, build_model, config_from_hydra

CONF = Path(__file__).parent / "seed000_conf"
MODELS = sorted(p.relative_to(CONF).as_posix() for p in (CONF / "model").rglob("*.yaml"))
DATA = sorted(p.relative_to(CONF).as_posix() for p in (CONF / "data").rglob("*.yaml"))

# what each refused file must say: the key, and why
REFUSED = {
    "model/archive/wandb_sequential2D.yaml": r"block_types\[0\]\[0\] is WandBModule, which loads a trained model from a W&B run",
    "data/lunar_all.yaml": r"dataset 'lunar' is not supported: .*PPO policy",
    "data/lunar_last.yaml": r"dataset 'lunar' is not supported",
    "data/sequence_type/addition.yaml": r"_target_ is set: this is a Hydra sub-group file",
    "data/sequence_type/random.yaml": r"_target_ is set",
    "data/sequence_type/uniform.yaml": r"_target_ is set",
}
DATA_LOADS = {"data/adroit_door.yaml": "D4RL/door/expert-v2", "data/adroit_hammer.yaml": "D4RL/hammer/expert-v2",
              "data/kitchen.yaml": "D4RL/kitchen/mixed-v2", "data/kitchencomplete.yaml": "D4RL/kitchen/complete-v2",
              "data/random_anomaly.yaml": "random_anomaly", "data/baseline_addition.yaml": "digit_sequences",
              "data/both_random.yaml": "digit_sequences", "data/both_uniform.yaml": "digit_sequences"}
# (x, y) the model reads and writes -> the seed data set it was written for
SIZES = {(2500, 10), (39, 28), (46, 26), (83, 9), (71, 9), (81, 9), (8, 4), (4, 2), (6, 3)}


def model_config(rel: str) -> Config:
    return Config.model_validate(config_from_hydra({}, {}, CONF / rel))


def sizes(cfg: Config) -> tuple[int, int]:
    units = cfg.loss_units()
    x = cfg.row_sizes[0] if cfg.row_sizes else cfg.sizes[0] if cfg.sizes else cfg.input_size
    return x, cfg.declared_sizes()[1] if units is None else units[1] - units[0]


def test_the_sample_covers_what_the_issue_names():
    assert len(MODELS) + len(DATA) >= 30 and len(DATA) == 13
    for name in ("model/ra_test_111111.yaml", "model/ra_test_lstm_.yaml", "model/archive/GRU.yaml"):
        assert name in MODELS
    structure = [m for m in MODELS if "structure" in yaml.safe_load((CONF / m).read_text())]
    sequential = [m for m in MODELS if yaml.safe_load((CONF / m).read_text())["model_type"] == "sequential2D"]
    assert len(structure) >= 5 and len(sequential) >= 4


@pytest.mark.parametrize("rel", MODELS)
def test_each_model_file_loads_and_builds_or_says_why_not(rel):
    if rel in REFUSED:
        with pytest.raises(trainers.InvalidConfig) as info:
            trainers.validate_config("sparse_rnn", config_from_hydra({}, {}, CONF / rel))
        assert re.search(REFUSED[rel], str(info.value.errors)), info.value.errors
        return
    trainers.validate_config("sparse_rnn", config_from_hydra({}, {}, CONF / rel))  # the 422 path passes
    cfg = model_config(rel)
    x, y = sizes(cfg)
    assert (x, y) in SIZES, (rel, x, y)
    data = type("Sizes", (), {"input_size": x, "output_size": y, "name": rel})
    model, facts = build_model(cfg, data, seed=0, device="cpu", representation="dense")
    out = model(torch.zeros(2, 3, x))
    assert out.shape == (2, 3, y)
    assert facts["trainable_parameters"] > 0


@pytest.mark.parametrize("rel", DATA)
def test_each_data_file_loads_or_says_why_not(rel):
    section = config_from_hydra({}, CONF / rel, {})
    if rel in REFUSED:
        with pytest.raises(trainers.InvalidConfig) as info:
            trainers.validate_config("sparse_rnn", section)
        assert re.search(REFUSED[rel], str(info.value.errors)), info.value.errors
        assert any(name.endswith("data") for name, _ in info.value.errors)  # the 422 names the field
        return
    cfg = Config.model_validate(section)
    assert cfg.data.dataset == DATA_LOADS[rel]
    assert cfg.data.test_reuses_validation is (rel == "data/kitchencomplete.yaml")


def test_structure_is_a_label_and_ra_test_111111_is_the_seeds_dense_network():
    cfg = model_config("model/ra_test_111111.yaml")
    assert cfg.structure == "111111" and cfg.bias is True and cfg.learning_rate == 1e-4
    data = type("Sizes", (), {"input_size": 2500, "output_size": 10, "name": "ra"})
    model, facts = build_model(cfg, data, seed=0, device="cpu", representation=None)
    # R=1.00 everywhere below the first row, non-zero: every entry of the [29 + 10, 2539] rows, plus biases
    assert facts["trainable_parameters"] == 39 * 2539 + 39


def test_gru_yaml_reads_the_last_ten_units_of_its_130():
    cfg = model_config("model/archive/GRU.yaml")
    assert cfg.loss_units() == (120, 130)
    data = type("Sizes", (), {"input_size": 2500, "output_size": 10, "name": "ra"})
    model, facts = build_model(cfg, data, seed=0, device="cpu", representation=None)
    assert isinstance(model, ReadUnits) and facts["hidden_size"] == 130
    x = torch.randn(2, 4, 2500)
    assert model.model(x).shape == (2, 4, 130) and torch.equal(model(x), model.model(x)[..., 120:])
    # seed's torch.nn.GRU(2500, 130): 3 * 130 * (2500 + 130) + 6 * 130, no readout (y is the hidden state)
    assert facts["trainable_parameters"] == 3 * 130 * 2630 + 6 * 130
    with pytest.raises(ValueError, match="reads 10 units of y but the data .* has 28"):
        build_model(cfg, type("Sizes", (), {"input_size": 2500, "output_size": 28, "name": "door"}), 0, "cpu", None)


def test_sequential2d_becomes_the_same_block_description():
    cfg = model_config("model/ra_test_S2D_sparse.yaml")
    assert cfg.model_type == "description" and cfg.row_sizes == [2500, 145, 10]
    # their blocks[i][j] maps input block i to output block j: our block (row j, column i)
    assert [str(t) for t in cfg.block_types[1]] == ["R=0.2", "R=1.0", "R=1.0"]
    assert [str(t) for t in cfg.block_types[2]] == ["R=0.2", "R=0.2", "R=1.0"]
    assert cfg.bias == [False, True, True]  # only blocks feeding h and y from y carry a bias
    data = type("Sizes", (), {"input_size": 2500, "output_size": 10, "name": "ra"})
    model, facts = build_model(cfg, data, seed=0, device="cpu", representation="dense")
    assert isinstance(model, BlockRNN)
    # the h rows get a bias; the seed summed one per block, the same function with one vector per row
    assert facts["trainable_parameters"] == int(model.mask.sum()) + 145 + 10
    mlp = model_config("model/archive/sequential2D_MLP.yaml")
    assert [[str(t) for t in row] for row in mlp.block_types] == [
        ["0", "0", "0", "0"], ["W", "0", "0", "0"], ["0", "W", "0", "0"], ["0", "0", "W", "0"]]
    assert mlp.trainable[1][0] is True and mlp.bias == [False, True, True, True]


def test_ra_test_lstm_has_the_seeds_hidden_11_and_its_parameter_count():
    cfg = model_config("model/ra_test_lstm_.yaml")
    data = type("Sizes", (), {"input_size": 2500, "output_size": 10, "name": "ra"})
    model, facts = build_model(cfg, data, seed=0, device="cpu", representation=None)
    seed_lstm = torch.nn.LSTM(2500, 11, num_layers=1, proj_size=10)  # the seed's IterativeLSTM
    assert facts["hidden_size"] == 11
    assert facts["trainable_parameters"] == sum(p.numel() for p in seed_lstm.parameters()) == 110_638


@pytest.mark.parametrize("rel", ["model/ra_test_111111.yaml", "model/ra_test_lstm_.yaml", "model/archive/GRU.yaml",
                                 "model/ra_test_S2D_sparse.yaml"])
def test_a_few_train_two_steps_on_random_anomaly(tmp_path, rel):
    base = {"max_epochs": 1, "max_steps": 2, "use_cuda": False}  # their conf/base/fast.yaml, two steps
    config = config_from_hydra(base, CONF / "data/random_anomaly.yaml", CONF / rel)
    config["data"].update(train_size=8, validation_size=4, test_size=4, batch_size=4)
    result = harness.Harness(tmp_path).train(sparse_rnn, config)
    assert result["steps"] == 2 and result["loss_kind"] == "cross_entropy" and result["sequence_position"] == "last"
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["parameters"] > 0


def test_the_mnist_files_become_offline_digit_sequences_as_the_seed_builds_them():
    from worker.trainers.iterativenn.data import IGNORE

    kinds = {}
    for stem in ("baseline_addition", "both_random", "both_uniform"):
        cfg = Config.model_validate(config_from_hydra({}, CONF / f"data/{stem}.yaml", {}))
        kinds[stem] = (cfg.data.sequence_type, cfg.data.transform, cfg.data.copies, cfg.data.min_copies,
                       cfg.data.max_copies, cfg.data.evaluate_loss)
        assert not sparse_rnn.shuffles(cfg)  # the seed's sequence loaders kept their order
    assert kinds == {"baseline_addition": ("addition", "baseline", 3, 1, 1, "all"),
                     "both_random": ("random", "both", 1, 3, 3, "all"),
                     "both_uniform": ("uniform", "both", 1, 3, 3, "all")}

    from worker.trainers.iterativenn import digit_sequences

    addition = digit_sequences.build("addition", 12, 2, 2, seed=0, copies=3, image_size=10)
    assert (addition.input_size, addition.output_size, addition.loss) == (100, 10, "cross_entropy")
    for i in range(12):
        x, y = addition.train[i]
        assert x.shape == (9, 100) and y.shape == (9,)
        a, b, total = int(y[0]), int(y[3]), int(y[6])
        assert (y[:3] == a).all() and (y[3:6] == b).all() and total == (a + b) % 10
        assert torch.equal(x[0], x[2]) and torch.equal(x[6:], torch.zeros(3, 100))  # the blank asks for the sum
    uniform = digit_sequences.build("uniform", 4, 1, 1, seed=0, min_copies=2, max_copies=4, evaluate_loss="last",
                                    image_size=10, transform_name="both")
    lengths = set()
    for i in range(4):
        x, y = uniform.train[i]
        lengths.add(len(y))
        assert (x == x[0]).all() and (y[:-1] == IGNORE).all() and 0 <= int(y[-1]) < 10  # one image, k times
    assert lengths <= {2, 3, 4}
    random_ = digit_sequences.build("random", 4, 1, 1, seed=0, min_copies=3, max_copies=3, image_size=10)
    x, y = random_.train[0]
    assert len(set(y.tolist())) == 1 and not torch.equal(x[0], x[1])  # different images of one digit
    assert torch.equal(random_.train[0][0], digit_sequences.build("random", 4, 1, 1, seed=0, min_copies=3,
                                                                  max_copies=3, image_size=10).train[0][0])


def test_an_mnist_file_trains_two_steps_with_their_description_model(tmp_path):
    base = {"max_epochs": 1, "max_steps": 2, "use_cuda": False}
    config = config_from_hydra(base, CONF / "data/baseline_addition.yaml", CONF / "model/archive/description_tiny.yaml")
    config["data"].update(train_size=8, validation_size=4, test_size=4, batch_size=4)
    result = harness.Harness(tmp_path).train(sparse_rnn, config)
    assert result["steps"] == 2 and result["dataset"] == "digit_sequences:addition"
    assert result["loss_kind"] == "cross_entropy" and 0.0 <= result["test_accuracy"] <= 1.0
