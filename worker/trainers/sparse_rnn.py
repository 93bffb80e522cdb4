"""sparse_rnn: seed 000's iterated sparse block-matrix RNNs (qbhershey/iterativenn) and their baselines.

One masked linear map over the state z = [x | h | y] is applied once per sequence step: the step's input
is inserted into the x block, then z <- act(W z + b); the loss reads the y block at every step or only at
the last (`sequence_position`). `model_type`: `description` (the block model; aliases `block`, `sparse`),
`lstm`, `gru`, `rnn`, `mlp`, all trained by the same data, loss and loop. Adam, lr 1e-4 as in the seed.

Data (`data.dataset`): `random_anomaly` (the real parquet files when `data.path` names their folder, else
the same task built offline from scikit-learn's digits) or a Minari dataset id such as
`D4RL/door/expert-v2` (behaviour cloning, see iterativenn/minari_data.py).

Seed 000's Hydra files are accepted as written: either their keys at the top level, or the composed
sections {base: ..., data: ..., model: ..., logger: ...}; `config_from_hydra` reads the YAML files.
Seed keys that only steered Lightning or W&B (factory_type, name, profiler, base_dir, logger,
callbacks' idx_list strings) are accepted and ignored; `seed` is ignored too: the grid's `seeds` decide.
`fuse_key` names the configs that sparse_fused.py's `train_many` trains as one stacked model (a gang).
A run whose logged loss is no longer finite ends with `Diverged` (gated_rnn's), solo and fused alike.
See docs/sparse_rnn.md.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from worker.trainers.gated_rnn import Diverged
from worker.trainers.iterativenn import anomaly, seed_files
from worker.trainers.iterativenn.baselines import ReadUnits, build_baseline, hidden_for_parameters
from worker.trainers.iterativenn.blocks import (
    BlockRNN,
    Description,
    choose_representation,
)
from worker.trainers.iterativenn.data import Batch, SequenceData, pad
from worker.trainers.iterativenn.sampling import hidden_for_budget, with_hidden

MODEL_ALIASES = {
    "description": "description", "block": "description", "blocks": "description", "sparse": "description",
    "description_sparse": "description", "masked": "description", "sparse_rnn": "description",
    "lstm": "lstm", "gru": "gru", "rnn": "rnn", "mlp": "mlp",
}
BASELINE_DEFAULT_HIDDEN = 64  # a baseline's hidden size when neither hidden_size, param_budget nor row_sizes say
RANDOM_ANOMALY_NAMES = {"random_anomaly", "randomanomaly", "random-anomaly", "ra"}
SEED_SECTIONS = ("base", "model")  # merged into the top level; `data` stays a section, `logger` is dropped
DATA_KEYS = ("dataset", "train_size", "validation_size", "test_size", "batch_size", "path", "image_size",
             "minari_root", "score_episodes", "shuffle", "test_reuses_validation", "kitchen_goals",
             "sequence_type", "transform", "copies", "min_copies", "max_copies", "evaluate_loss")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    dataset: str = "random_anomaly"
    name: str | None = None  # the seed's label for the data file; ignored
    # None: the source's own default (RandomAnomaly 10000/1000/1000; Minari: part B's loader decides).
    train_size: int | None = Field(default=None, ge=1)
    validation_size: int | None = Field(default=None, ge=0)
    test_size: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=16, ge=1, le=65_536)
    path: str | None = None  # RandomAnomaly: the folder of the real parquet files
    image_size: int = Field(default=50, ge=4, le=256)  # offline RandomAnomaly: side of each image
    minari_root: str | None = None  # Minari: where datasets live (else minari's own default)
    download: bool = False  # Minari: fetch a dataset missing locally (needs a network; off: fail at once)
    score_episodes: int = Field(default=0, ge=0, le=10_000)  # Minari: env episodes to score the policy on
    # None: the seed's data factories' choice: RandomAnomaly in file order, Minari shuffled each epoch
    shuffle: bool | None = None
    # the test split is the validation split (seed 000's kitchen-complete: 19 episodes split [15, 4, 0])
    test_reuses_validation: bool = False
    # kitchen observations: both goal dicts (DataFactoryFK/FKC) or only the desired goals (DataFactoryFKB)
    kitchen_goals: Literal["achieved_desired", "desired"] = "achieved_desired"
    # digit_sequences (the seed's MNIST files, built offline; iterativenn/digit_sequences.py)
    sequence_type: Literal["uniform", "random", "addition"] = "uniform"
    transform: str = "baseline"
    copies: int = Field(default=1, ge=1, le=100)  # addition: how often each of its 3 images is shown
    min_copies: int = Field(default=1, ge=1, le=100)
    max_copies: int = Field(default=1, ge=1, le=100)
    evaluate_loss: Literal["all", "last"] = "all"

    @field_validator("transform")
    @classmethod
    def _known_transform(cls, value: str) -> str:
        if value not in anomaly.TRANSFORMS:
            raise ValueError(f"unknown transform {value!r}; known: {', '.join(anomaly.TRANSFORMS)}")
        return value

    @model_validator(mode="after")
    def _copies(self) -> DataConfig:
        if self.min_copies > self.max_copies:
            raise ValueError(f"min_copies {self.min_copies} must be <= max_copies {self.max_copies}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _seed_names(cls, value: Any) -> Any:
        """Seed 000's dataset names (adroit_door, franka_kitchen, kitchencomplete, ...) -> Minari ids;
        what cannot be mapped (MNIST, lunar, sequence_type sub-files) is refused naming the key and why."""
        return seed_files.seed_dataset(value) if isinstance(value, dict) else value

    @property
    def is_random_anomaly(self) -> bool:
        return self.dataset.strip().lower() in RANDOM_ANOMALY_NAMES

    @property
    def is_digit_sequences(self) -> bool:
        return self.dataset.strip().lower() == "digit_sequences"

    @property
    def is_minari(self) -> bool:
        return not (self.is_random_anomaly or self.is_digit_sequences)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model_type: Literal["description", "lstm", "gru", "rnn", "mlp"] = "description"
    # ---- the block description (model_type description) -------------------------------------------
    row_sizes: list[int] | None = None  # [x, h..., y]; x and y must match the data
    col_sizes: list[int] | None = None  # must equal row_sizes (the map takes z to z)
    hidden_size: int | None = Field(default=None, ge=1, le=100_000)  # overrides every hidden block size
    density: float = Field(default=0.1, gt=0.0, le=1.0)  # R=density everywhere when block_types is absent
    block_types: list[list[Any]] | None = None
    initialization_types: list[list[Any]] | None = None
    trainable: list[list[Any]] | None = None
    activations: list[str] | bool | None = None  # per block row; the seed's LSTM files say False
    activation_sizes: list[int] | None = None  # must equal row_sizes
    bias: bool | list[bool] = True  # or one flag per block row (seed 000's sequential2D files)
    param_budget: int | None = Field(default=None, ge=1)  # solve the hidden size for this many parameters
    representation: Literal["auto", "dense", "sparse"] = "auto"
    # ---- baselines -----------------------------------------------------------------------------------
    input_size: int | None = Field(default=None, ge=1)  # checked against the data when given
    output_size: int | None = Field(default=None, ge=1)
    sizes: list[int] | None = None  # mlp: [x, h1, ..., y]
    # ---- training --------------------------------------------------------------------------------------
    learning_rate: float = Field(default=1e-4, gt=0.0, le=10.0, validation_alias=AliasChoices("learning_rate", "lr"))
    max_epochs: int = Field(default=5, ge=1, le=100_000, validation_alias=AliasChoices("max_epochs", "epochs"))
    max_steps: int | None = Field(default=None, ge=1)  # stop after this many optimizer steps
    sequence_position: Literal["all", "last"] | None = None  # None: callbacks.loss's, else the data's
    loss: Literal["mse", "cross_entropy"] | None = None  # None: callbacks.loss.func's, else the data's
    log_every: int = Field(default=10, ge=1, validation_alias=AliasChoices("log_every", "log_every_n_steps"))
    checkpoint_every: int = Field(default=200, ge=1)
    use_cuda: bool = True
    num_threads: int | None = Field(default=None, ge=1, le=256)
    data: DataConfig = Field(default_factory=DataConfig)
    # ---- seed keys accepted and ignored (Lightning / Hydra / W&B plumbing) ------------------------------
    callbacks: dict[str, Any] | None = None
    factory_type: str | None = None
    name: str | None = None
    profiler: Any = None
    base_dir: Any = None
    seed: Any = None
    structure: Any = None  # the seed's label of which blocks are non-zero ('111111', 'lstm', 'balanced')

    @model_validator(mode="before")
    @classmethod
    def _seed_layout(cls, value: Any) -> Any:
        """Merge Hydra sections (base, model) into the top level, move flat data keys into `data`."""
        if not isinstance(value, dict):
            return value
        out = {k: v for k, v in value.items() if k not in SEED_SECTIONS and k != "logger"}
        value = dict(value)
        model = value.get("model")
        if isinstance(model, dict) and str(model.get("model_type", "")).lower() == "sequential2d":
            value["model"] = seed_files.from_sequential2d(model)
        elif str(out.get("model_type", "")).lower() == "sequential2d":
            out = seed_files.from_sequential2d(out)
        for section in SEED_SECTIONS:
            part = value.get(section)
            if part is None:
                continue
            if not isinstance(part, dict):
                raise ValueError(f"'{section}' must be a mapping (a Hydra config group)")
            for key, item in part.items():
                if key in out and out[key] != item:
                    raise ValueError(f"'{key}' is set both at the top level and in '{section}'")
                out[key] = item
        data = dict(out.get("data") or {})
        for key in DATA_KEYS:
            if key in out:
                if key in data and data[key] != out[key]:
                    raise ValueError(f"'{key}' is set both at the top level and in 'data'")
                data[key] = out.pop(key)
        if data:
            out["data"] = data
        return out

    @field_validator("model_type", mode="before")
    @classmethod
    def _model_alias(cls, value: Any) -> Any:
        key = str(value).strip().lower()
        if key not in MODEL_ALIASES:
            raise ValueError(f"unknown model_type '{value}'; use description (block), lstm, gru, rnn or mlp")
        return MODEL_ALIASES[key]

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.row_sizes is not None:
            for name in ("col_sizes", "activation_sizes"):
                other = getattr(self, name)
                if other is not None and list(other) != list(self.row_sizes):
                    raise ValueError(f"{name} {other} must equal row_sizes {self.row_sizes}")
        if self.model_type == "description":
            self.description()  # parse now, so a bad block string is a 422 at POST, not a failed job
        self.loss_units()  # and a loss idx_list outside y
        return self

    # ---- derived ---------------------------------------------------------------------------------------
    def loss_from_callbacks(self) -> tuple[str | None, str | None]:
        loss = (self.callbacks or {}).get("loss") or {}
        func = str(loss.get("func", "")).lower()
        kind = "mse" if "mse" in func else "cross_entropy" if "crossentropy" in func.replace("_", "") else None
        position = loss.get("sequence_position")
        return kind, (position if position in ("all", "last") else None)

    def declared_sizes(self) -> tuple[int | None, int | None]:
        """(state size, y size) as the config itself writes them (before data, budgets or overrides), or
        None where it does not say: what seed 000's absolute callbacks idx_list ranges count in."""
        if self.model_type == "description":
            return (sum(self.row_sizes), self.row_sizes[-1]) if self.row_sizes else (None, None)
        if self.model_type == "mlp":
            return (sum(self.sizes), self.sizes[-1]) if self.sizes else (None, None)
        if None in (self.input_size, self.hidden_size, self.output_size):
            return None, self.output_size
        if self.model_type == "lstm":
            return self.input_size + self.hidden_size + self.output_size, self.output_size
        return self.input_size + 2 * self.hidden_size, self.output_size  # gru / rnn: h and y are both hidden

    def loss_units(self) -> tuple[int, int] | None:
        """Which units of the model's y block the loss reads (callbacks.loss.idx_list), None for all."""
        frame, out = self.declared_sizes()
        callbacks = self.callbacks or {}
        if out is None or "idx_list" not in (callbacks.get("loss") or {}):
            return None
        if frame is None and "size" not in (callbacks.get("initialization") or {}):
            return None  # nothing says what the absolute indices count in
        return seed_files.loss_units(callbacks, frame or 0, out)

    def baseline_hidden(self, input_size: int, output_size: int) -> int:
        """A baseline's hidden size: `hidden_size` when given; else the one whose parameter count is closest
        to `param_budget`, or to the block description's own expected count when `row_sizes` describe one
        (so lstm/gru/rnn in a grid beside the description model are compared like for like)."""
        if self.hidden_size is not None:
            return self.hidden_size
        budget = self.param_budget
        if budget is None and self.row_sizes:
            budget = round(self.description(input_size, self.row_sizes[-1] if self.loss_units() else output_size)
                           .expected_trainable())
        if budget is None:
            return BASELINE_DEFAULT_HIDDEN
        return hidden_for_parameters(self.model_type, input_size, output_size, budget)

    def description(self, input_size: int | None = None, output_size: int | None = None) -> Description:
        """The block description; sizes of x and y come from the data when known (placeholders before)."""
        sizes = list(self.row_sizes) if self.row_sizes else [input_size or 1, self.hidden_size or 64, output_size or 1]
        if input_size is not None:
            sizes[0] = input_size
        if output_size is not None:
            sizes[-1] = output_size
        n = len(sizes)
        if self.hidden_size is not None and n > 2:
            sizes[1:-1] = [self.hidden_size] * (n - 2)
        kind = f"R={self.density}" if self.density < 1.0 else "W"
        types = self.block_types or [[0] * n] + [[kind] * n for _ in range(n - 1)]
        inits = self.initialization_types or [[0] * n] + [["G=0,0.05"] * n for _ in range(n - 1)]
        train = self.trainable or [[False] * n] + [["non-zero"] * n for _ in range(n - 1)]
        acts = self.activations if isinstance(self.activations, list) else ["Identity"] + ["ReLU"] * (n - 2) + ["Identity"]
        desc = Description.parse(sizes, types, inits, train, acts, self.bias)
        if self.param_budget is not None:
            desc = with_hidden(desc, hidden_for_budget(desc, self.param_budget))
        return desc


def config_from_hydra(base: str | Path | dict, data: str | Path | dict, model: str | Path | dict) -> dict[str, Any]:
    """A sparse_rnn config from seed 000's three Hydra files (conf/base/*.yaml, conf/data/*.yaml,
    conf/model/*.yaml), or already-loaded dicts: {base: ..., data: ..., model: ...}, which Config accepts."""
    import yaml

    def load(part):
        return dict(part) if isinstance(part, dict) else yaml.safe_load(Path(part).read_text()) or {}

    data_part = load(data)
    if not isinstance(data, dict):  # kitchencomplete.yaml says franka_kitchen; its runner loaded kitchen-complete
        data_part = seed_files.data_file(data_part, Path(data).stem)
    return {"base": load(base), "data": data_part, "model": load(model)}


# Keys a gang's members may differ in (the rest is the block layout, sizes, data and run length), and the
# seed-plumbing keys that change nothing.
PER_MEMBER_KEYS = ("learning_rate", "log_every", "checkpoint_every", "num_threads", "name", "seed", "profiler",
                   "base_dir", "factory_type", "structure")
FUSED_MODEL_TYPES = ("description", "mlp")  # the block models; lstm / gru / rnn are never fused


def fuse_key(cfg: Config) -> str | None:
    """What the members of one stacked model (sparse_fused.train_many) share: everything but lr, log and
    checkpoint intervals and seed plumbing, i.e. the same block layout and sizes, data, loss and run length
    (each member still draws its own blocks, data and order from its own seed). None for lstm/gru/rnn."""
    if cfg.model_type not in FUSED_MODEL_TYPES:
        return None
    shape = cfg.model_dump(mode="json", exclude=set(PER_MEMBER_KEYS))
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    sizes = "x".join(str(s) for s in (cfg.row_sizes or cfg.sizes or [])) or f"h{cfg.hidden_size}"
    readable = f"sparse_rnn/{cfg.model_type}/{sizes}/{cfg.data.dataset}"
    return f"{readable[:160]}/{digest}"  # jobs.fuse_key holds 200 characters; the digest decides


# ---- data -------------------------------------------------------------------------------------------------
def load_data(cfg: Config, seed: int) -> SequenceData:
    d = cfg.data
    test_size = 0 if d.test_reuses_validation else d.test_size
    if d.is_random_anomaly:
        data = anomaly.load(d.path, d.train_size or 10_000, 1_000 if d.validation_size is None else d.validation_size,
                            1_000 if test_size is None else test_size, seed, d.image_size)
    elif d.is_digit_sequences:
        from worker.trainers.iterativenn import digit_sequences

        data = digit_sequences.build(d.sequence_type, d.train_size or 2_000,
                                     200 if d.validation_size is None else d.validation_size,
                                     200 if test_size is None else test_size, seed, d.transform, d.min_copies,
                                     d.max_copies, d.copies, d.evaluate_loss, d.image_size)
    else:
        # part B's loader, imported only when used: RandomAnomaly runs need no Minari
        from worker.trainers.iterativenn import minari_data

        extra = {"kitchen_goals": d.kitchen_goals} if d.kitchen_goals != "achieved_desired" else {}
        data = minari_data.load_sequences(d.dataset, d.train_size, d.validation_size, test_size, seed,
                                          minari_root=d.minari_root, download=d.download, **extra)
    if d.test_reuses_validation:
        data.test = data.validation
    return data


def shuffles(cfg: Config) -> bool:
    """Seed 000's loaders: RandomAnomaly's and the MNIST sequences' DataLoaders kept their order, the
    Minari ones shuffled."""
    return cfg.data.shuffle if cfg.data.shuffle is not None else cfg.data.is_minari


def sequence_loss(pred: torch.Tensor, batch: Batch, kind: str, position: str) -> tuple[torch.Tensor, int, int]:
    """(mean loss over valid targets, correct predictions, counted predictions). Padded or NaN targets
    (mse) and IGNORE targets (cross-entropy) carry no loss, as the seed's NaN truths did."""
    if position == "last":
        rows = torch.arange(len(batch.lengths), device=pred.device)
        pred, y = pred[rows, batch.lengths - 1].unsqueeze(1), batch.y[rows, batch.lengths - 1].unsqueeze(1)
    else:
        y = batch.y
    if kind == "mse":
        valid = ~torch.isnan(y)
        if not bool(valid.any()):
            return pred.sum() * 0.0, 0, 0
        return F.mse_loss(pred[valid], y[valid]), 0, 0
    valid = y >= 0
    logits, labels = pred[valid], y[valid]
    if labels.numel() == 0:
        return pred.sum() * 0.0, 0, 0
    correct = int((logits.argmax(dim=-1) == labels).sum())
    return F.cross_entropy(logits, labels), correct, int(labels.numel())


def build_model(cfg: Config, data: SequenceData, seed: int, device: str, representation: str | None):
    """(model, facts). `representation` comes from a checkpoint when resuming, so a job that started
    sparse on one machine stays sparse on another whatever auto would pick there."""
    torch.manual_seed(seed)  # nn.LSTM/GRU/RNN initialise from the global generator
    gen = torch.Generator().manual_seed(seed)
    # Seed 000's loss may read only some units of y (GRU.yaml: the last 10 of its 130): the model keeps
    # its own y size and the data must match the units read.
    units = cfg.loss_units()
    out = data.output_size if units is None else cfg.declared_sizes()[1]
    if units is not None and units[1] - units[0] != data.output_size:
        raise ValueError(f"callbacks.loss.idx_list reads {units[1] - units[0]} units of y but the data "
                         f"({data.name}) has {data.output_size} outputs")
    for name, want, have in (("input_size", cfg.input_size, data.input_size), ("output_size", cfg.output_size, out)):
        if want is not None and want != have:
            raise ValueError(f"{name} is {want} but the data ({data.name}) has {have}")
    if cfg.model_type == "description":
        if cfg.row_sizes and (cfg.row_sizes[0], cfg.row_sizes[-1]) != (data.input_size, out):
            raise ValueError(f"row_sizes {cfg.row_sizes} must start with the data's input size {data.input_size} "
                             f"and end with its output size {out} ({data.name})")
        desc = cfg.description(data.input_size, out)
        if representation is None:
            representation = cfg.representation if cfg.representation != "auto" else choose_representation(
                desc.expected_density(), desc.n, device)
        model = BlockRNN(desc, representation, gen)
        facts = model.describe() | {"hidden_size": desc.sizes[1] if len(desc.sizes) > 2 else 0}
        return ReadUnits.around(model, units), facts
    hidden = cfg.baseline_hidden(data.input_size, out) if cfg.model_type != "mlp" else cfg.hidden_size or BASELINE_DEFAULT_HIDDEN
    if cfg.model_type == "mlp" and cfg.sizes and (cfg.sizes[0], cfg.sizes[-1]) != (data.input_size, out):
        raise ValueError(f"sizes {cfg.sizes} must start with {data.input_size} and end with {out}")
    acts = cfg.activations if isinstance(cfg.activations, list) else None
    model = build_baseline(cfg.model_type, data.input_size, hidden, out, gen, cfg.sizes, acts, cfg.bias)
    trainable = (model.trainable_parameters() if isinstance(model, BlockRNN)
                 else sum(p.numel() for p in model.parameters() if p.requires_grad))
    return ReadUnits.around(model, units), {"representation": "dense", "hidden_size": hidden,
                                            "trainable_parameters": trainable}


@torch.no_grad()
def evaluate(model, pairs, batch_size: int, kind: str, position: str, device) -> dict[str, float]:
    if len(pairs) == 0:
        return {}
    total, weight, correct, counted = 0.0, 0, 0, 0
    for start in range(0, len(pairs), batch_size):
        batch = pad([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))]).to(device)
        loss, c, n = sequence_loss(model(batch.x), batch, kind, position)
        total += float(loss) * len(batch.lengths)
        weight += len(batch.lengths)
        correct, counted = correct + c, counted + n
    out = {"loss": total / weight}
    if kind == "cross_entropy" and counted:
        out["accuracy"] = correct / counted
    return out


# ---- training ---------------------------------------------------------------------------------------------
def train(cfg: Config, ctx) -> dict:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR "beta" notices, once per job
    warnings.filterwarnings("ignore", message=".*LSTM with projections.*")  # oneDNN falls back; harmless
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = torch.device(ctx.device if cfg.use_cuda else "cpu")
    data = load_data(cfg, ctx.seed)
    kind_cb, position_cb = cfg.loss_from_callbacks()
    kind = cfg.loss or kind_cb or data.loss
    position = cfg.sequence_position or position_cb or data.sequence_position

    state = ctx.load_checkpoint()
    model, facts = build_model(cfg, data, ctx.seed, device.type, state["representation"] if state else None)
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    shuffler = torch.Generator().manual_seed(ctx.seed)
    shuffle = shuffles(cfg)
    batches_per_epoch = math.ceil(len(data.train) / cfg.data.batch_size)
    total_steps = batches_per_epoch * cfg.max_epochs if cfg.max_steps is None else min(cfg.max_steps, batches_per_epoch * cfg.max_epochs)

    if state is None:
        state = {"step": 0, "epoch": 0, "pos": 0, "order": None, "window": [], "curve": [], "val_curve": [],
                 "min_val_loss": float("inf"), "elapsed": 0.0}
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        shuffler.set_state(state["shuffler"])
    step, epoch, pos, order = state["step"], state["epoch"], state["pos"], state["order"]
    window, curve, val_curve, min_val = state["window"], state["curve"], state["val_curve"], state["min_val_loss"]
    began = time.monotonic() - state["elapsed"]

    def checkpoint() -> None:
        ctx.save_checkpoint({
            "step": step, "epoch": epoch, "pos": pos, "order": order, "window": window, "curve": curve,
            "val_curve": val_curve, "min_val_loss": min_val, "elapsed": time.monotonic() - began,
            "representation": facts["representation"], "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "shuffler": shuffler.get_state(),
        })

    while step < total_steps:
        if order is None:  # a new epoch: a fresh shuffle, or the stored order
            order = torch.randperm(len(data.train), generator=shuffler).tolist() if shuffle else list(range(len(data.train)))
            pos = 0
        indices = order[pos : pos + cfg.data.batch_size]
        batch = pad([data.train[i] for i in indices]).to(device)
        loss, _, _ = sequence_loss(model(batch.x), batch, kind, position)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step, pos = step + 1, pos + len(indices)
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == total_steps:
            value = sum(window) / len(window)
            window = []
            curve.append([step, value])
            ctx.report(step, loss=value, epoch=epoch)
            ctx.progress(step, total_steps)
            if not math.isfinite(value):  # a NaN / inf loss never recovers: end here, as gated_rnn does
                raise Diverged(step, value)
        if pos >= len(order):  # end of an epoch: validate
            epoch, order = epoch + 1, None
            metrics = evaluate(model, data.validation, cfg.data.batch_size, kind, position, device)
            if metrics:
                min_val = min(min_val, metrics["loss"])
                val_curve.append([step, metrics["loss"]])
                ctx.report(step, **{f"val_{k}": v for k, v in metrics.items()})
        if step % cfg.checkpoint_every == 0 or step == total_steps or ctx.should_stop():
            checkpoint()
            if ctx.should_stop() and step < total_steps:
                return {"stopped_at": step}

    result = {
        "final_loss": curve[-1][1] if curve else None, "steps": step, "epochs": epoch, "loss_curve": curve,
        "val_curve": val_curve, "min_val_loss": min_val if val_curve else None,
        "seconds": round(time.monotonic() - began, 2), "parameters": facts["trainable_parameters"],
        "model_type": cfg.model_type, "representation": facts["representation"],
        "hidden_size": facts.get("hidden_size"), "density": facts.get("density"), "dataset": data.name,
        "loss_kind": kind, "sequence_position": position,
    }
    result.update({f"test_{k}": v for k, v in evaluate(model, data.test, cfg.data.batch_size, kind, position, device).items()})
    if cfg.data.score_episodes and cfg.data.is_minari:
        result.update(score(model, cfg, data, ctx.seed, device))
    return result


def score(model, cfg: Config, data: SequenceData, seed: int, device) -> dict:
    """Seed 000's reward scoring: the policy sees the growing observation history each env step and acts
    with its last output. `model_step_fn(history [t, n_in] float array) -> action [n_out] array`."""
    # part B's env runner, imported only when used
    from worker.trainers.iterativenn import scoring

    @torch.no_grad()
    def model_step_fn(history):
        x = torch.as_tensor(history, dtype=torch.float32, device=device).reshape(1, -1, data.input_size)
        return model(x)[0, -1].cpu().numpy()

    model.eval()
    return scoring.score_policy(model_step_fn, cfg.data.dataset, cfg.data.score_episodes, seed,
                                kitchen_goals=cfg.data.kitchen_goals)
