"""perturbation: seed 003's RNNs trained by weight perturbation (Rohit01-zoey/ChemoTaxis-using-Perturbation-
Techniques), every perturbation of a step in one batched forward.

How to read it: `Config` takes the seed's config.yml as written (sections model / training / data / log);
`elman_losses` is the one stacked forward (M members' weights on a leading dimension, built on
worker/trainers/population.py), serving P perturbations of one config and K configs of one shape alike;
`gradient` turns a step's member losses into a gradient for each `gradient_computation` (each method's
probes and estimate are functions of their own, which perturbation_fused.py shares); `Run` is one config's
run (data, weights, reports, checkpoints, result) and `train` its epoch loop (one step on the whole training
set per epoch, as the seed). `fuse_key` says which configs perturbation_fused.py stacks into one forward.

Model (the seed's rnn_1hl): h = tanh(x Wxh + h Whh + bh), y = h Why + by, weights drawn as the seed does
(numpy randn under `training.seed`, zero biases), so `seed: 12` starts from the seed's own weights. `rnn_xhl`
stacks `num_layers` such layers. Task: next-step prediction of amplitude * sin(2 pi f t + phase) on `length`
points of t in [0, 1]; the loss is the seed's: squared error summed over time, averaged over sequences.

Gradients: `wp` the seed's forward difference on every weight, (L(w + sigma e_i) - L(w)) / sigma; `spsa`
central differences along `num_directions` random +-1 directions; `np` node perturbation (Gaussian noise
of std sigma on every unit's input at every step, num_directions draws); `bptt` autograd, the baseline the
seed left as a stub. Every method steps w += clip(-lr * grad, min_clip_value, max_clip_value).
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from worker.trainers import population

Params = dict[str, Tensor]


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Literal["rnn_1hl", "rnn_xhl"] = "rnn_1hl"
    input_size: int = Field(default=1, ge=1, le=4096)
    hidden_size: int = Field(default=20, ge=1, le=4096)
    output_size: int = Field(default=1, ge=1, le=4096)
    num_layers: int = Field(default=1, ge=1, le=16, validation_alias=AliasChoices("num_layers", "hidden_layers"))

    @model_validator(mode="after")
    def _one_layer_for_rnn_1hl(self):
        if self.name == "rnn_1hl" and self.num_layers != 1:
            raise ValueError(f"rnn_1hl has one hidden layer; use name: rnn_xhl for num_layers={self.num_layers}")
        return self


class TrainingSection(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    gradient_computation: Literal["wp", "np", "spsa", "bptt"] = "wp"
    epochs: int = Field(default=2000, ge=1, le=10_000_000)
    # A number, or the seed's later LearnerRateScheduler type written in its place (`learning_rate: 'linear'`).
    learning_rate: Annotated[float, Field(gt=0.0, le=1e3)] | Literal["constant", "linear", "step"] = Field(
        default=1e-4, validation_alias=AliasChoices("learning_rate", "lr"))
    base_learning_rate: float | None = Field(default=None, gt=0.0, le=1e3, description="a schedule's rate after warm-up")
    warmup_epochs: int = Field(default=10, ge=0, description="a schedule's linear warm-up from lr_init (the seed's 10)")
    lr_init: float = Field(default=0.0, ge=0.0, le=1e3)
    final_learning_rate: float | None = Field(default=None, ge=0.0, le=1e3, description="linear: the rate it ends at")
    total_epochs: int | None = Field(default=None, ge=1, description="linear: the epoch it ends at; None: epochs")
    decay_rate: float | None = Field(default=None, gt=0.0, le=1e3, description="step: the factor every decay_steps")
    decay_steps: int | None = Field(default=None, ge=1, description="step: epochs between decays")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="None: the job's seed")
    perturbation: float = Field(default=1e-3, gt=0.0, le=10.0, validation_alias=AliasChoices("perturbation", "sigma"))
    num_directions: int = Field(default=16, ge=1, le=100_000, description="spsa and np draws per step")
    clip: bool = True
    max_clip_value: float = 3.0
    min_clip_value: float = -3.0
    # the seed's numpy float64; float32 serves wp at sigma 1e-3 as well (docs/perturbation.md), not at 1e-5
    dtype: Literal["float64", "float32"] = "float64"
    members_per_forward: int = Field(default=4096, ge=1, description="caps the memory of one stacked forward")
    log_every: int = Field(default=1, ge=1, description="epochs between reports")
    checkpoint_every: int = Field(default=200, ge=1, description="epochs")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Tiny matmuls: extra intra-op threads cost more than they give, and jobs side by side oversubscribe.
    num_threads: int | None = Field(default=1, ge=1, le=256, description="torch CPU threads; None: torch's")

    @model_validator(mode="after")
    def _clip_range(self):
        if self.clip and self.min_clip_value > self.max_clip_value:
            raise ValueError(f"min_clip_value ({self.min_clip_value}) is above max_clip_value ({self.max_clip_value})")
        return self

    @model_validator(mode="after")
    def _schedule_keys(self):
        """The keys the seed's LearnerRateScheduler demands of each type, refused by name when missing."""
        schedule_keys = ("base_learning_rate", "final_learning_rate", "total_epochs", "decay_rate", "decay_steps")
        if not isinstance(self.learning_rate, str):
            given = [key for key in schedule_keys if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} belong to a learning_rate schedule ('constant', 'linear', "
                                 f"'step'); learning_rate is the number {self.learning_rate}")
            return self
        needed = {"constant": ["base_learning_rate"], "linear": ["base_learning_rate", "final_learning_rate"],
                  "step": ["base_learning_rate", "decay_rate", "decay_steps"]}[self.learning_rate]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            raise ValueError(f"learning_rate '{self.learning_rate}' needs {', '.join(missing)}")
        if self.learning_rate == "linear" and (self.total_epochs or self.epochs) <= self.warmup_epochs:
            raise ValueError(f"linear: total_epochs ({self.total_epochs or self.epochs}) must exceed "
                             f"warmup_epochs ({self.warmup_epochs})")
        return self


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Literal["sine"] = "sine"
    amplitude: float = 10.0
    frequency: float = 1.0
    phase: float | Literal["random"] = 0.0  # "random": each sequence its own phase in [0, 2 pi)
    length: int = Field(default=100, ge=3, le=1_000_000, validation_alias=AliasChoices("length", "time_stamps"))
    n_samples: int = Field(default=1, ge=1, le=1_000_000)
    noise: float = Field(default=0.0, ge=0.0, description="std of Gaussian noise added to every point")
    train_split: float = Field(default=0.6, gt=0.0, le=1.0)
    validation_split: float = Field(default=0.2, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _splits(self):
        if self.train_split + self.validation_split > 1.0 + 1e-9:
            raise ValueError(f"train_split + validation_split = {self.train_split + self.validation_split} > 1")
        return self


class LogSection(BaseModel):
    """The seed's log section; gridfleet keeps the metrics, so log_file is accepted and not written."""

    model_config = ConfigDict(extra="forbid")

    log_file: str | None = None
    experiment_name: str | None = None


class Config(BaseModel):
    """Seed 003's config.yml as written: model, training, log sections (plus data and fsm, ours)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    data: DataSection = Field(default_factory=DataSection)
    log: LogSection = Field(default_factory=LogSection)
    fsm: bool = False  # after training, generate the whole sequence from its first sample (the seed's FSM)
    fsm_steps: int | None = Field(default=None, ge=1, le=1_000_000, description="None: data.length - 1")

    @model_validator(mode="after")
    def _fits_the_data(self):
        if self.model.input_size != 1 or self.model.output_size != 1:
            raise ValueError(f"the sine task has one feature: model.input_size and model.output_size must be 1 "
                             f"(got {self.model.input_size} and {self.model.output_size})")
        return self


# ---- seed 003's config.yml as a grid -------------------------------------------------------------------
def is_seed_conf(data: dict[str, Any]) -> bool:
    """A seed-003 config.yml rather than a grid spec: model and training sections, no trainer/config keys."""
    return ("trainer" not in data and "config" not in data and isinstance(data.get("model"), dict)
            and isinstance(data.get("training"), dict) and "gradient_computation" in data["training"])


def grid_from_seed_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """A one-job grid for a seed-003 config.yml; its training.seed becomes the job's seed."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in conf.items()}
    seed = config["training"].pop("seed", None)
    experiment = (config.get("log") or {}).get("experiment_name") or "perturbation"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(experiment)).strip("-._")[:100] or "perturbation"
    return {"name": name, "trainer": "perturbation", "config": config, "seeds": [int(seed or 0)],
            "objective": "min:val_loss"}


# ---- the model: stacked Elman RNN ---------------------------------------------------------------------
def layer_names(num_layers: int) -> list[tuple[str, str, str]]:
    """(input weight, recurrent weight, bias) per layer: the seed's Wxh, Whh, bh, then Wxh2, Whh2, bh2..."""
    return [(f"Wxh{s}", f"Whh{s}", f"bh{s}") for s in [""] + [str(i) for i in range(2, num_layers + 1)]]


def layers_of(params: Params) -> list[tuple[str, str, str]]:
    """The layers a parameter dict holds: three tensors per layer, then Why and by."""
    return layer_names((len(params) - 2) // 3)


def init_params(model: ModelSection, seed: int, dtype: torch.dtype) -> Params:
    """As the seed's RNN.initialize: np.random.seed(seed), randn weights in the order Wxh, Whh, Why, zero biases."""
    rng = np.random.RandomState(seed)
    params: Params = {}
    size = model.input_size
    for index, (wxh, whh, bh) in enumerate(layer_names(model.num_layers)):
        params[wxh] = torch.from_numpy(rng.randn(size, model.hidden_size))
        params[whh] = torch.from_numpy(rng.randn(model.hidden_size, model.hidden_size))
        if index == 0:  # the seed draws Why right after layer one's weights
            params["Why"] = torch.from_numpy(rng.randn(model.hidden_size, model.output_size))
        params[bh] = torch.zeros(model.hidden_size, dtype=torch.float64)
        size = model.hidden_size
    params["by"] = torch.zeros(model.output_size, dtype=torch.float64)
    return {key: value.to(dtype) for key, value in params.items()}


def elman_forward(params: Params, inputs: Tensor, noise: list[Tensor | None] | None = None,
                  keep_states: bool = False) -> tuple[Tensor, list[Tensor]]:
    """M members at once: params are stacked [M, ...]; inputs [B, T, I] (shared) or [M, B, T, I].
    `noise`, one per layer plus the output, is added to that layer's pre-activations ([M, B, T, units]).
    Returns y [M, B, T, O] and, with keep_states, each layer's hidden states [M, B, T, H] (views)."""
    members = population.size(params)
    params = {key: value.contiguous() for key, value in params.items()}  # else bmm copies W at every step
    batch, steps = inputs.shape[-3], inputs.shape[-2]
    layers = layers_of(params)
    noise = noise or [None] * (len(layers) + 1)
    states: list[Tensor] = []
    sequence = inputs  # the layer's input: [B, T, I] or [M, B, T, I], then [T, M, B, H]
    for index, ((wxh, whh, bh), extra) in enumerate(zip(layers, noise)):
        drive = input_drive(sequence, params[wxh], params[bh], members, time_major=index > 0)
        if extra is not None:
            drive += extra.permute(2, 0, 1, 3)
        sequence = recurrence(drive, params[whh])
        states.append(sequence.permute(1, 2, 0, 3))
    # [M, T * B, H] is a view of the time-major states when B = 1 (bmm reads its strides as they are)
    hidden = sequence.transpose(0, 1).reshape(members, steps * batch, -1)
    y = population.linear(hidden, params["Why"], params["by"]).view(members, steps, batch, -1).transpose(1, 2)
    if noise[-1] is not None:
        y = y + noise[-1]
    return y, states if keep_states else []


def input_drive(x: Tensor, wxh: Tensor, bh: Tensor, members: int, time_major: bool) -> Tensor:
    """x Wxh + bh for every step, before the recurrence, as a new time-major [T, M, B, H] tensor.
    x: shared [B, T, I], each member's own [M, B, T, I], or a lower layer's states [T, M, B, I] (time_major)."""
    hidden = wxh.shape[-1]
    if time_major:
        steps, _, batch, _ = x.shape
        drive = population.linear(x.transpose(0, 1).reshape(members, steps * batch, -1), wxh, bh)
        return drive.view(members, steps, batch, hidden).transpose(0, 1).contiguous()
    batch, steps = x.shape[-3], x.shape[-2]
    if x.shape[-1] == 1:  # the sine task: an outer product, one addcmul (3x an addmm with K = 1)
        # [T, 1, B, 1] shared by the members, or each member's own [T, M, B, 1] (a gang's own waves)
        xt = x.transpose(0, 1).unsqueeze(1) if x.dim() == 3 else x.permute(2, 0, 1, 3)
        args = (bh.view(1, members, 1, hidden), xt, wxh.view(1, members, 1, hidden))
        if torch.is_grad_enabled() and (wxh.requires_grad or bh.requires_grad):
            return torch.addcmul(*args)  # autograd refuses out=; recurrence() makes the layout contiguous
        # out=: broadcasting alone picks another layout than [T, M, B, H], and the copy costs as much again
        return torch.addcmul(*args, out=x.new_empty(steps, members, batch, hidden))
    if x.dim() == 3:  # shared inputs: one matmul for all members, [T * B, I] @ [I, M * H], already time-major
        rows = x.transpose(0, 1).reshape(steps * batch, -1)
        flat = torch.addmm(bh.reshape(1, -1), rows, wxh.transpose(0, 1).reshape(wxh.shape[1], -1))
        return flat.view(steps, batch, members, hidden).transpose(1, 2).contiguous()  # a view when B = 1
    rows = x.transpose(1, 2).reshape(members, steps * batch, -1)
    drive = population.linear(rows, wxh, bh).view(members, steps, batch, hidden)
    return drive.transpose(0, 1).contiguous()


def recurrence(drive: Tensor, whh: Tensor) -> Tensor:
    """h[t] = tanh(drive[t] + h[t - 1] Whh), h[-1] = 0, over a time-major drive [T, M, B, H] -> the states.
    Under no_grad in place on the drive: two kernels a step, whatever M, and no allocation. With autograd
    (bptt) the same sums out of place: in-place steps on views of one tensor would defeat its version checks."""
    drive = drive.contiguous()  # a strided step would be copied by every baddbmm_
    rows = drive.unbind(0)
    if torch.is_grad_enabled() and (drive.requires_grad or whh.requires_grad):
        out = [rows[0].tanh()]
        for row in rows[1:]:
            out.append(torch.baddbmm(row, out[-1], whh).tanh())
        return torch.stack(out)
    rows[0].tanh_()
    for previous, row in zip(rows[:-1], rows[1:]):
        row.baddbmm_(previous, whh).tanh_()
    return drive


def sequence_loss(y: Tensor, targets: Tensor) -> Tensor:
    """The seed's mse_loss_seq: squared error summed over time and features, averaged over sequences -> [M]."""
    return (y - targets).square().sum(dim=(-1, -2)).mean(dim=-1)


def elman_losses(params: Params, inputs: Tensor, targets: Tensor, noise: list[Tensor | None] | None = None) -> Tensor:
    """The loss of every member [M], one stacked forward."""
    y, _ = elman_forward(params, inputs, noise)
    return sequence_loss(y, targets)


# ---- flat weight vectors: a perturbation is a direction in the space of all weights ---------------------
def flatten(params: Params) -> Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


def unflatten(vectors: Tensor, like: Params) -> Params:
    """[M, n] weight vectors -> stacked params [M, ...] shaped as `like` (one member's params)."""
    out, start = {}, 0
    for key, value in like.items():
        out[key] = vectors[:, start:start + value.numel()].view(vectors.shape[0], *value.shape)
        start += value.numel()
    return out


def member_losses(vectors: Tensor, like: Params, inputs: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """Losses of M weight vectors, in stacked forwards of at most `chunk` members (a memory cap)."""
    return torch.cat([elman_losses(unflatten(part, like), inputs, targets) for part in vectors.split(chunk)])


# ---- gradients ------------------------------------------------------------------------------------------
# Each perturbation method is probes (the weight vectors or noise to evaluate) and an estimate (the gradient from
# their losses), so that one config's probes and a gang's (worker/trainers/perturbation_fused.py) are the same.
def wp_vectors(w: Tensor, sigma: float) -> Tensor:
    """The seed's probes: the base net as member 0, then every weight moved by sigma alone -> [n + 1, n]."""
    return torch.cat([w.unsqueeze(0), w + sigma * torch.eye(w.numel(), dtype=w.dtype, device=w.device)])


def wp_estimate(losses: Tensor, sigma: float) -> Tensor:
    return (losses[1:] - losses[0]) / sigma


def wp_gradient(params: Params, inputs: Tensor, targets: Tensor, sigma: float, chunk: int) -> tuple[Tensor, Tensor, int]:
    """The seed's weight perturbation: every weight moved by sigma alone, the base net as member 0."""
    vectors = wp_vectors(flatten(params), sigma)
    losses = member_losses(vectors, params, inputs, targets, chunk)
    return wp_estimate(losses, sigma), losses[0], len(vectors)


def spsa_vectors(w: Tensor, sigma: float, directions: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random +-1 directions d and the probes [w, w + sigma d, w - sigma d] -> ([2 directions + 1, n], d)."""
    d = (torch.randint(0, 2, (directions, w.numel()), generator=generator) * 2 - 1).to(w)
    return torch.cat([w.unsqueeze(0), w + sigma * d, w - sigma * d]), d


def spsa_estimate(losses: Tensor, d: Tensor, sigma: float) -> Tensor:
    directions = len(d)
    plus, minus = losses[1:1 + directions], losses[1 + directions:]
    return ((plus - minus) / (2 * sigma)) @ d / directions


def spsa_gradient(params: Params, inputs: Tensor, targets: Tensor, sigma: float, directions: int,
                  generator: torch.Generator, chunk: int) -> tuple[Tensor, Tensor, int]:
    """Central differences along random +-1 directions d: mean of (L(w + sigma d) - L(w - sigma d)) / (2 sigma) d."""
    vectors, d = spsa_vectors(flatten(params), sigma, directions, generator)
    losses = member_losses(vectors, params, inputs, targets, chunk)
    return spsa_estimate(losses, d, sigma), losses[0], 2 * directions + 1


def np_noise(params: Params, inputs: Tensor, sigma: float, directions: int,
             generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """The draws z ~ N(0, 1) per layer plus the output [directions, B, T, units], and the noise of the
    directions + 1 members (member 0 is the clean run: zero noise) that the stacked forward adds."""
    batch, steps, _ = inputs.shape
    widths = [params[whh].shape[-1] for _, whh, _ in layers_of(params)] + [params["Why"].shape[-1]]
    draws = [torch.randn(directions, batch, steps, width, generator=generator, dtype=torch.float64).to(inputs)
             for width in widths]
    return draws, [torch.cat([torch.zeros_like(z[:1]), sigma * z]) for z in draws]


def np_estimate(params: Params, inputs: Tensor, draws: list[Tensor], losses: Tensor, states: list[Tensor],
                sigma: float) -> Tensor:
    """The gradient from the directions + 1 members' losses and hidden states (member 0 clean)."""
    directions = len(draws[0])
    scale = (losses[1:] - losses[0]) / sigma  # dL / sigma^2 times xi = dL / sigma times z
    grads: Params = {}
    previous = inputs
    for (wxh, whh, bh), z, hidden in zip(layers_of(params), draws, states):
        dnet = torch.einsum("k,kbth->bth", scale, z) / directions
        clean = hidden[0]
        before = torch.cat([torch.zeros_like(clean[:, :1]), clean[:, :-1]], dim=1)  # h(t - 1)
        grads[wxh] = torch.einsum("bti,bth->ih", previous, dnet)
        grads[whh] = torch.einsum("bti,bth->ih", before, dnet)
        grads[bh] = dnet.sum(dim=(0, 1))
        previous = clean
    dout = torch.einsum("k,kbto->bto", scale, draws[-1]) / directions
    grads["Why"] = torch.einsum("bth,bto->ho", previous, dout)
    grads["by"] = dout.sum(dim=(0, 1))
    return flatten({key: grads[key] for key in params})


def np_gradient(params: Params, inputs: Tensor, targets: Tensor, sigma: float, directions: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """Node perturbation: noise xi ~ N(0, sigma^2) on every unit's input at every step; dL/dnet ~ dL xi / sigma^2,
    and each weight's gradient is that times its presynaptic activity in the clean run."""
    draws, noise = np_noise(params, inputs, sigma, directions, generator)
    stacked = population.expand(params, directions + 1)
    y, states = elman_forward(stacked, inputs, noise, keep_states=True)
    losses = sequence_loss(y, targets)
    return np_estimate(params, inputs, draws, losses, states, sigma), losses[0], directions + 1


def bptt_gradient(params: Params, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
    """Autograd through the same forward, the net as a population of one."""
    leaves = {key: value.detach().clone().requires_grad_(True) for key, value in params.items()}
    with torch.enable_grad():  # the training loop runs under no_grad
        loss = elman_losses(population.expand(leaves, 1), inputs, targets)[0]
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return torch.cat([g.reshape(-1) for g in grads]), loss.detach(), 1


def gradient(cfg: TrainingSection, params: Params, inputs: Tensor, targets: Tensor,
             generator: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """(flat gradient, the unperturbed training loss, forwards evaluated) for one step."""
    method, sigma = cfg.gradient_computation, cfg.perturbation
    if method == "wp":
        return wp_gradient(params, inputs, targets, sigma, cfg.members_per_forward)
    if method == "spsa":
        return spsa_gradient(params, inputs, targets, sigma, cfg.num_directions, generator, cfg.members_per_forward)
    if method == "np":
        return np_gradient(params, inputs, targets, sigma, cfg.num_directions, generator)
    return bptt_gradient(params, inputs, targets)


def learning_rate(cfg: TrainingSection, epoch: int) -> float:
    """The rate of epoch `epoch` (from 0), as the seed's LearnerRateScheduler: a number is constant; a schedule
    warms up linearly from lr_init to base_learning_rate over warmup_epochs, then 'constant' holds it, 'linear'
    goes to final_learning_rate at total_epochs (held there after; the seed's formula would go on below it) and
    'step' multiplies it by decay_rate every decay_steps epochs (counted from 0, warm-up included)."""
    if not isinstance(cfg.learning_rate, str):
        return cfg.learning_rate
    base = cfg.base_learning_rate
    if epoch < cfg.warmup_epochs:
        return cfg.lr_init + (base - cfg.lr_init) * epoch / cfg.warmup_epochs
    if cfg.learning_rate == "linear":
        total = cfg.total_epochs or cfg.epochs
        done = min(epoch, total) - cfg.warmup_epochs
        return base - (base - cfg.final_learning_rate) * done / (total - cfg.warmup_epochs)
    if cfg.learning_rate == "step":
        return base * cfg.decay_rate ** (epoch // cfg.decay_steps)
    return base


def update(cfg: TrainingSection, params: Params, grad: Tensor, lr: float) -> Params:
    """The seed's step: w += -lr * grad, each element clipped to [min_clip_value, max_clip_value]."""
    step = -lr * grad
    if cfg.clip:
        step = step.clamp(cfg.min_clip_value, cfg.max_clip_value)
    return population.member(unflatten((flatten(params) + step).unsqueeze(0), params), 0)


# ---- the data ----------------------------------------------------------------------------------------------
def sine_data(cfg: DataSection, seed: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """As the seed's SineWaveLoader: amplitude * sin(2 pi f t + phase), t = linspace(0, 1, length), [n, length, 1].
    One sequence trains and validates itself (the seed's run); more are split train / validation / test."""
    rng = np.random.RandomState(seed)
    t = np.linspace(0.0, 1.0, cfg.length)
    phases = rng.rand(cfg.n_samples) * 2 * np.pi if cfg.phase == "random" else np.full(cfg.n_samples, cfg.phase)
    waves = cfg.amplitude * np.sin(2 * np.pi * cfg.frequency * t[None, :] + phases[:, None])
    if cfg.noise > 0:
        waves = waves + rng.normal(0.0, cfg.noise, waves.shape)
    waves = torch.from_numpy(waves[:, :, None]).to(dtype)
    if cfg.n_samples == 1:
        return {"train": waves, "val": waves}
    order = torch.from_numpy(rng.permutation(cfg.n_samples))
    n_train = max(1, int(cfg.train_split * cfg.n_samples))
    n_val = int(cfg.validation_split * cfg.n_samples)
    split = {"train": waves[order[:n_train]], "val": waves[order[n_train:n_train + n_val]],
             "test": waves[order[n_train + n_val:]]}
    return {key: value for key, value in split.items() if len(value)}


def fsm_rollout(params: Params, first: Tensor, steps: int) -> Tensor:
    """The seed's FSM: from one sample, feed each output back as the next input for `steps` steps -> [steps + 1]."""
    layers = layers_of(params)
    hs = [torch.zeros(params[whh].shape[-1], dtype=first.dtype) for _, whh, _ in layers]
    x, out = first.reshape(1), [first.reshape(1)]
    for _ in range(steps):
        signal = x
        for i, (wxh, whh, bh) in enumerate(layers):
            hs[i] = torch.tanh(signal @ params[wxh] + hs[i] @ params[whh] + params[bh])
            signal = hs[i]
        x = signal @ params["Why"] + params["by"]
        out.append(x)
    return torch.cat(out)


def plot_rollout(target: Tensor, generated: Tensor, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(target.numpy(), "r", label="target")
    ax.plot(generated.numpy(), "b--", label="generated (FSM)")
    ax.set_xlabel("time step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.resolve()


# ---- the run -----------------------------------------------------------------------------------------------
class Diverged(ArithmeticError):
    """The training loss is no longer finite (NaN or inf): the run has diverged and ends here."""

    def __init__(self, epoch: int, value: float):
        super().__init__(f"training loss diverged to {value} at epoch {epoch} (try a smaller learning_rate or "
                         "clip: true)")
        self.epoch = epoch


def fuse_key(cfg: Config) -> str:
    """What the members of one stacked forward (`perturbation_fused.train_many`) must share: the net's shape,
    the method and its number of probes, the data's shape, dtype and device. sigma, the learning rate and its
    schedule, clipping, the seed, epochs, the wave itself (amplitude, frequency, phase, noise), fsm and the
    bookkeeping may differ: each member is its own rows of the stack."""
    m, tc, d = cfg.model, cfg.training, cfg.data
    probes = f"/D{tc.num_directions}" if tc.gradient_computation in ("spsa", "np") else ""
    return (f"perturbation/{m.name}/{m.input_size}-{m.hidden_size}x{m.num_layers}-{m.output_size}"
            f"/{tc.gradient_computation}{probes}/{tc.dtype}/{tc.device}"
            f"/T{d.length}/N{d.n_samples}:{d.train_split}:{d.validation_split}")


class Run:
    """One config's run: its data, weights, generator and bookkeeping (reports, checkpoints, stop, result).
    `train` drives one; perturbation_fused drives a gang of them, one stacked step for all."""

    def __init__(self, cfg: Config, ctx):
        tc = self.tc = cfg.training
        self.cfg, self.ctx = cfg, ctx
        self.device = torch.device(ctx.device if tc.device == "auto" else tc.device)
        dtype = torch.float64 if tc.dtype == "float64" else torch.float32
        seed = tc.seed if tc.seed is not None else ctx.seed
        self.data = {key: value.to(self.device) for key, value in sine_data(cfg.data, seed, dtype).items()}
        # next-step prediction: y[t] is scored against x[t + 1]; the last point is only a target
        self.pairs = {key: (value[:, :-1], value[:, 1:]) for key, value in self.data.items()}
        self.generator = torch.Generator().manual_seed(seed)  # spsa directions and np noise, drawn on the CPU
        saved = ctx.load_checkpoint()
        if saved is None:
            self.params = {key: value.to(self.device) for key, value in init_params(cfg.model, seed, dtype).items()}
            self.state = {"epoch": 0, "forwards": 0, "elapsed": 0.0, "curve": [], "best_val": math.inf}
        else:
            self.params = {key: value.to(self.device) for key, value in saved["params"].items()}
            self.generator.set_state(saved["generator"])
            self.state = saved["run"]
        self.began = time.monotonic() - self.state["elapsed"]
        self.n_weights = sum(value.numel() for value in self.params.values())

    @property
    def done(self) -> bool:
        return self.state["epoch"] >= self.tc.epochs

    def checkpoint(self) -> dict:
        state = self.state
        state["elapsed"] = time.monotonic() - self.began
        return self.ctx.save_checkpoint({"step": state["epoch"], "run": dict(state),
                                         "generator": self.generator.get_state(),
                                         "params": {key: value.cpu() for key, value in self.params.items()}})

    def record(self, train_loss: float, val_loss: float, forwards: int, lr: float, started: float) -> dict | None:
        """The bookkeeping after one epoch's step (self.params already updated): report, the divergence check,
        stop and checkpoint. Returns {"stopped_at": epoch} when the run must stop, else None."""
        tc, cfg, ctx, state = self.tc, self.cfg, self.ctx, self.state
        state["epoch"] += 1
        state["forwards"] += forwards + 1
        state["best_val"] = min(state["best_val"], val_loss)
        epoch = state["epoch"]
        if epoch % tc.log_every == 0 or epoch == tc.epochs:
            points = (cfg.data.length - 1) * cfg.model.output_size
            state["curve"].append([epoch, train_loss, val_loss])
            ctx.report(epoch, train_loss=train_loss, val_loss=val_loss, loss=train_loss,
                       train_mse=train_loss / points, val_mse=val_loss / points,
                       epoch_seconds=time.monotonic() - started, forwards=state["forwards"], learning_rate=lr)
            ctx.progress(epoch, tc.epochs)
        if not math.isfinite(train_loss):
            raise Diverged(epoch, train_loss)
        if ctx.should_stop():
            self.checkpoint()
            return {"stopped_at": epoch}
        if epoch % tc.checkpoint_every == 0:
            self.checkpoint()
        return None

    def finish(self) -> dict:
        """The last checkpoint, the final losses, the weights file and the FSM rollout: the job's result."""
        cfg, tc, ctx, params, state = self.cfg, self.tc, self.ctx, self.params, self.state
        with torch.no_grad():
            pointer = self.checkpoint()
            final = {key: float(elman_losses(population.expand(params, 1), *pair)[0]) for key, pair in self.pairs.items()}
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        weights_path = ctx.workdir / "weights.pt"
        torch.save({key: value.cpu() for key, value in params.items()}, weights_path)
        points = (cfg.data.length - 1) * cfg.model.output_size
        result = {
            "train_loss": final["train"], "val_loss": final["val"], "best_val_loss": min(state["best_val"], final["val"]),
            "train_mse": final["train"] / points, "val_mse": final["val"] / points,
            "epochs": state["epoch"], "forwards": state["forwards"], "weights": self.n_weights,
            "gradient_computation": tc.gradient_computation, "seconds": round(time.monotonic() - self.began, 3),
            "weights_file": str(weights_path.resolve()), "checkpoint": pointer["uri"],
            "loss_curve": state["curve"][-200:],
        }
        if "test" in final:
            result["test_loss"] = final["test"]
        if cfg.fsm:
            target = self.data["val"][0, :, 0].cpu()
            steps = cfg.fsm_steps or cfg.data.length - 1
            cpu_params = {key: value.cpu() for key, value in params.items()}
            with torch.no_grad():
                generated = fsm_rollout(cpu_params, target[0], steps)
            overlap = min(len(target), len(generated))
            result["fsm_mse"] = float((generated[:overlap] - target[:overlap]).square().mean())
            result["fsm_steps"] = steps
            result["fsm_plot"] = str(plot_rollout(target, generated, ctx.workdir / "fsm.png",
                                                  f"FSM rollout ({tc.gradient_computation}), mse {result['fsm_mse']:.3g}"))
        return result


def train(cfg: Config, ctx) -> dict:
    tc = cfg.training
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    run = Run(cfg, ctx)
    with torch.no_grad():
        while not run.done:
            started = time.monotonic()
            grad, train_loss, forwards = gradient(tc, run.params, *run.pairs["train"], run.generator)
            val_loss = float(elman_losses(population.expand(run.params, 1), *run.pairs["val"])[0])
            lr = learning_rate(tc, run.state["epoch"])
            run.params = update(tc, run.params, grad, lr)
            stopped = run.record(float(train_loss), val_loss, forwards, lr, started)
            if stopped is not None:
                return stopped
    return run.finish()
