"""learning_rules: seed 004's RNNs trained by three learning rules on decision tasks (bmcmahan2016/RNN_Learning_Rules).

How to read it: `Config` (the seed's command-line options as keys), then the task (`make_trials`,
`validation_set`, `accuracy`), the rate network (`init_network`, `run`: one batched forward for P
members, built on population.py), then one function per rule (`train_bptt`, `train_ga`, `train_ff`; the first
two set up by `bptt_start`/`ga_start`), `Progress` (the bookkeeping every rule's loop shares: stop rule, reports,
checkpoints, result) and `train`, which dispatches on the rule and saves the trained matrices (`finish`).
`fuse_key` says which configs learning_rules_fused.py trains as one batched forward (bptt and ga; ff never).

The network (column convention, as the seed): h <- (1 - dt) h + dt (J_in u + J_rec phi(h) + b).
`dynamics: tanh` (the issue's network, and the seed's full-FORCE one): phi = tanh, y = tanh(J_out tanh h).
`dynamics: seed` (the seed's rnn.py for BPTT and GA): phi = 1 + tanh, y = J_out h.
Every rule stops when the min of the last `stop_window` (10) validation accuracies >= 0.9, or at its cap.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from worker.trainers import population

SIGNAL_MEAN = 0.1857  # the seed's taskMean: a trial's signal is +-U(0,1) * this
VALIDATION_MEANS = 20  # the seed's validation set cycles through linspace(0, 0.1875, 20)
RULE_PREFIXES = {"bp": "bptt", "ga": "ga", "ge": "ga", "ff": "ff"}  # train_models.py reads name[:2]
MATRICES = ("J_in", "J_rec", "J_out", "b")


def _names(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Config(BaseModel):
    """`python train_models.py bptt_x -v 0.5 --N 2` is {"model_name": "bptt_x", "-v": 0.5, "--N": 2}."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    rule: Literal["bptt", "ga", "ff"] | None = None
    model_name: str | None = Field(default=None, description="the seed's positional name; its prefix picks the rule")
    variance: float = Field(default=0.5, ge=0.0, le=100.0,
                            validation_alias=_names("variance", "v", "-v", "--variance", "taskVar"))
    mean: float = Field(default=SIGNAL_MEAN, gt=0.0, le=100.0,
                        validation_alias=_names("mean", "m", "-m", "--mean", "taskMean"))
    contexts: int | None = Field(default=None, ge=1, le=64, validation_alias=_names("contexts", "N", "--N"))
    rdm: bool = Field(default=False, validation_alias=_names("rdm", "--rdm"))
    context: bool = Field(default=False, validation_alias=_names("context", "--context"),
                          description="the seed's 2-context task")
    # The network, as rnn.py's hyperParams.
    hidden_size: int = Field(default=50, ge=1, le=4096, validation_alias=_names("hidden_size", "hiddenSize", "network_size"))
    g: float = Field(default=1.0, gt=0.0, le=100.0)
    dt: float = Field(default=0.1, gt=0.0, le=1.0)
    init_scale: float = Field(default=0.3, ge=0.0, le=100.0, validation_alias=_names("init_scale", "initScale"))
    dynamics: Literal["tanh", "seed"] = "tanh"
    # The task and validation.
    trial_length: int = Field(default=750, ge=2, le=100_000, validation_alias=_names("trial_length", "T", "trial_steps"))
    batch_size: int = Field(default=500, ge=1, le=100_000, validation_alias=_names("batch_size", "batchSize"))
    validation_trials: int = Field(default=2000, ge=1, le=1_000_000,
                                   validation_alias=_names("validation_trials", "test_trials"))
    stop_accuracy: float = Field(default=0.9, ge=0.0, le=1.0,
                                 validation_alias=_names("stop_accuracy", "termination_accuracy"))
    stop_window: int = Field(default=10, ge=1, le=10_000)
    max_steps: int | None = Field(default=None, ge=1, validation_alias=_names(
        "max_steps", "max_epochs", "max_generations", "max_trials", "num_epochs", "numGenerations"),
        description="epochs (bptt), generations (ga) or trials (ff); None: the seed's 20,000 / 2,000 / 5,000")
    # bptt: Adam on J_rec only, as the seed's Bptt.
    lr: float | None = Field(default=None, gt=0.0, le=10.0, validation_alias=_names("lr", "learning_rate"),
                             description="None: 5e-4, or 1e-4 for CDI with more than 2 contexts")
    trainable: list[Literal["J_in", "J_rec", "J_out", "b"]] = Field(default=["J_rec"], min_length=1)
    # ga
    population: int | None = Field(default=None, ge=2, le=100_000,
                                   validation_alias=_names("population", "numPop", "num_pop"),
                                   description="None: 20 for CDI, 50 for RDM")
    parents: int = Field(default=5, ge=1, validation_alias=_names("parents", "numParents"))
    mutation: float = Field(default=0.005, ge=0.0, le=100.0)
    # ff (full-FORCE, FF_Demo.py)
    ff_alpha: float | None = Field(default=None, gt=0.0, description="None: 1e4 CDI, 5e4 RDM")
    ff_dt: float = Field(default=0.003, gt=0.0)
    ff_tau: float = Field(default=0.03, gt=0.0)
    ff_steps_per_update: int = Field(default=2, ge=1)
    ff_error_trigger: int = Field(default=200, ge=1, validation_alias=_names("ff_error_trigger", "errorTrigger"),
                                  description="RLS updates at t = 0 and from this step on")
    ff_init_scale: float = Field(default=1.0, ge=0.0, validation_alias=_names("ff_init_scale", "init_act_scale"))
    # bookkeeping
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    num_threads: int | None = Field(default=None, ge=1, le=256, description="torch CPU threads; None: torch's default")

    @model_validator(mode="after")
    def _resolve(self):
        if self.model_name is not None:
            prefix_rule = RULE_PREFIXES.get(self.model_name.lower()[:2])
            if prefix_rule is None:
                raise ValueError(f"model_name '{self.model_name}' must start with bptt, ga or ff "
                                 "(the seed picks the rule by it)")
            if self.rule is not None and self.rule != prefix_rule:
                raise ValueError(f"rule '{self.rule}' contradicts model_name '{self.model_name}' ({prefix_rule})")
            self.rule = prefix_rule
        if self.rule is None:
            raise ValueError("rule: give rule (bptt, ga, ff) or a model_name starting with one")
        if sum([self.rdm, self.context, self.contexts is not None]) > 1:
            raise ValueError("rdm, context and N are one choice of task in the seed: give one of them")
        if self.context:
            self.contexts = 2
        if not self.rdm and self.contexts is None:
            self.contexts = 2
        if self.rule == "ff" and self.ff_error_trigger >= self.trial_length:
            raise ValueError(f"ff_error_trigger ({self.ff_error_trigger}) must be below trial_length ({self.trial_length})")
        if self.rule == "ga" and self.parents > self.population_size:
            raise ValueError(f"parents ({self.parents}) exceeds the population ({self.population_size})")
        return self

    @property
    def task(self) -> str:
        return "rdm" if self.rdm else "cdi"

    @property
    def inputs(self) -> int:
        return 1 if self.rdm else 2 * self.contexts

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if not self.rdm and self.contexts > 2 else 5e-4

    @property
    def population_size(self) -> int:
        return self.population if self.population is not None else (50 if self.rdm else 20)

    @property
    def alpha(self) -> float:
        return self.ff_alpha if self.ff_alpha is not None else (5e4 if self.rdm else 1e4)

    @property
    def step_cap(self) -> int:
        return self.max_steps if self.max_steps is not None else {"bptt": 20_000, "ga": 2_000, "ff": 5_000}[self.rule]


# ---- the task ---------------------------------------------------------------------------------------
def make_trials(cfg: Config, trials: int, gen: torch.Generator, means: Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """`trials` trials -> inputs [T, B, I] and targets [B] (+-1; 0 for a CDI trial of mean 0, as the seed).

    CDI (Ncontext.py): every signal channel is +-m (its own sign), m = U(0,1) * mean shared by the
    channels, plus N(0, variance^2) noise; one context channel, chosen uniformly, is 1 for the whole
    trial; the target is the sign of the attended channel. RDM (williams.py): one channel +-m + noise,
    target +-1."""
    device = gen.device
    if means is None:
        means = torch.rand(trials, generator=gen, device=device, dtype=dtype) * cfg.mean
    T = cfg.trial_length
    if cfg.rdm:
        signs = torch.where(torch.rand(trials, generator=gen, device=device) < 0.5, -1.0, 1.0).to(dtype)
        noise = cfg.variance * torch.randn(T, trials, 1, generator=gen, device=device, dtype=dtype)
        return (signs * means)[None, :, None] + noise, signs
    n = cfg.contexts
    signs = torch.where(torch.rand(trials, n, generator=gen, device=device) < 0.5, -1.0, 1.0).to(dtype)
    attended = torch.randint(n, (trials,), generator=gen, device=device)
    signal = (signs * means[:, None]).expand(T, trials, n)
    noise = cfg.variance * torch.randn(T, trials, n, generator=gen, device=device, dtype=dtype)
    context = torch.nn.functional.one_hot(attended, n).to(dtype).expand(T, trials, n)
    targets = torch.sign(signal[0, torch.arange(trials, device=device), attended])
    return torch.cat([signal + noise, context], dim=-1), targets


def validation_set(cfg: Config, device: str, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The seed's fixed validation set: trial i has mean linspace(0, 0.1875, 20)[i % 20]. Its own generator,
    so a resumed run rebuilds the same set."""
    gen = torch.Generator(device=device).manual_seed(seed + 1_000_003)
    ladder = torch.linspace(0.0, 0.1875, VALIDATION_MEANS, device=device, dtype=dtype)
    means = ladder[torch.arange(cfg.validation_trials, device=device) % VALIDATION_MEANS]
    return make_trials(cfg, cfg.validation_trials, gen, means=means, dtype=dtype)


def accuracy(final_output: Tensor, targets: Tensor) -> Tensor:
    """As rnn.GetValidationAccuracy: a trial is wrong when |target - sign(y_T)| > 1 (so a target of 0 never is)."""
    return ((targets - torch.sign(final_output)).abs() <= 1).to(torch.float32).mean(dim=-1)


def trial_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The seed's loss per trial (Mante 2013): (y_T - target)^2 + y_0^2. outputs [T, ..., B] -> [..., B]."""
    return (outputs[-1] - torch.sign(targets)) ** 2 + outputs[0] ** 2


# ---- the rate network ----------------------------------------------------------------------------------
def init_network(cfg: Config, gen: torch.Generator, members: int = 1) -> population.Params:
    """rnn.py's init for `members` networks: J_in ~ N(0,1)/2, J_rec ~ N(0,1) g^2/H (the seed's scale, not
    g/sqrt(H)), J_out ~ N(0,1)/10, b = 0."""
    H, I, device = cfg.hidden_size, cfg.inputs, gen.device
    return {
        "J_in": 0.5 * torch.randn(members, H, I, generator=gen, device=device),
        "J_rec": (cfg.g ** 2 / H) * torch.randn(members, H, H, generator=gen, device=device),
        "J_out": 0.1 * torch.randn(members, 1, H, generator=gen, device=device),
        "b": torch.zeros(members, H, device=device),
    }


def run(params: population.Params, inputs: Tensor, h0: Tensor, dt: float, dynamics: str = "tanh",
        keep_states: bool = False, all_outputs: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """All P members over a batch of trials in one batched matmul per step.

    params: J_in [P,H,I], J_rec [P,H,H], J_out [P,1,H], b [P,H]; inputs [T,B,I] (all members see the
    same trials), [T,P,B,I], or [T,G,B,I] for G groups of P/G consecutive members, each group its own trials
    (a gang of GA configs: each config's population on its own trials); h0 [B,H] or [P,B,H]. Returns outputs [T,P,B] (only steps 0 and T-1, as
    [2,P,B], with all_outputs=False: all the loss and the accuracy read) and, with keep_states, [T,P,B,H].

    Without autograd (GA fitness, validation) it runs in place (`_run_in_place`); with it (BPTT)
    `_run_autograd` computes the same sums out of place."""
    members = population.size(params)
    if inputs.dim() == 4 and members % inputs.shape[1]:
        raise ValueError(f"inputs for {inputs.shape[1]} groups cannot be shared by {members} members")
    # [u, 1, phi(h)] @ [J_in, b, J_rec]^T: input, bias and recurrence in one baddbmm per step
    weight = torch.cat([params["J_in"], params["b"].unsqueeze(-1), params["J_rec"]], dim=2).transpose(1, 2)
    h0 = h0 if h0.dim() == 3 else h0.unsqueeze(0).expand(members, *h0.shape)
    if torch.is_grad_enabled() and any(value.requires_grad for value in params.values()):
        return _run_autograd(weight, params["J_out"], inputs, h0, dt, dynamics, keep_states, all_outputs)
    # Chunking the trials to stay in cache was measured too (2^16..2^21 floats): within 5%, so not kept.
    return _run_in_place(weight, params["J_out"], inputs, h0, dt, dynamics, keep_states, all_outputs)


def _run_in_place(weight: Tensor, readout: Tensor, inputs: Tensor, h0: Tensor, dt: float, dynamics: str,
                  keep_states: bool, all_outputs: bool) -> Tensor | tuple[Tensor, Tensor]:
    """The whole batch, no allocation per step (a fresh 2 MB tensor a step costs page faults): h is
    updated in place by two baddbmm_, phi(h) [P, B, H] @ J_rec^T and [u, 1] [P, B, I + 1] @ [J_in, b]^T, and
    tanh writes phi into its own contiguous buffer (into a strided slice of one [u, 1, phi] it runs 3x slower)."""
    members, trials, units = h0.shape
    n_in = weight.shape[1] - units - 1
    w_in, w_rec = weight[:, :n_in + 1].contiguous(), weight[:, n_in + 1:].contiguous()
    u1 = h0.new_ones(members, trials, n_in + 1)
    h, phi = h0.clone(), torch.empty_like(h0)
    seed = dynamics == "seed"
    last = len(inputs) - 1
    outputs, states = [], []

    def set_phi() -> None:
        torch.tanh(h, out=phi)
        if seed:
            phi.add_(1.0)

    set_phi()
    into = u1[..., :n_in]
    grouped = inputs.dim() == 4 and inputs.shape[1] != members
    if grouped:  # [G, P / G, B, I]: each group's trials broadcast over its members
        into = into.view(inputs.shape[1], -1, trials, n_in)
    for t, u in enumerate(inputs):
        into.copy_(u.unsqueeze(1) if grouped else u)  # [B, I] shared by the members, [P, B, I] or [G, 1, B, I]
        h.baddbmm_(phi, w_rec, beta=1.0 - dt, alpha=dt)
        h.baddbmm_(u1, w_in, alpha=dt)
        set_phi()
        if all_outputs or t == 0 or t == last:
            # y = J_out h (seed) or tanh(J_out tanh h)
            outputs.append((h * readout).sum(-1) if seed else torch.tanh((phi * readout).sum(-1)))
        if keep_states:
            states.append(h.clone())
    out = torch.stack(outputs)
    return (out, torch.stack(states)) if keep_states else out


def _run_autograd(weight: Tensor, readout: Tensor, inputs: Tensor, h: Tensor, dt: float, dynamics: str,
                  keep_states: bool, all_outputs: bool) -> Tensor | tuple[Tensor, Tensor]:
    """The same forward out of place, for autograd (in-place steps would defeat its saved tensors)."""
    members = h.shape[0]
    ones = h.new_ones(members, h.shape[1], 1)
    seed = dynamics == "seed"
    phi = torch.tanh(h) + 1.0 if seed else torch.tanh(h)  # one tanh per step, shared by readout and recurrence
    last = len(inputs) - 1
    outputs, states = [], []
    for t, u in enumerate(inputs):
        if u.dim() == 2:
            u = u.unsqueeze(0).expand(members, *u.shape)
        elif len(u) != members:  # groups of members sharing their trials
            u = u.repeat_interleave(members // len(u), dim=0)
        h = torch.baddbmm(h, torch.cat([u, ones, phi], dim=-1), weight, beta=1.0 - dt, alpha=dt)
        phi = torch.tanh(h)
        if all_outputs or t == 0 or t == last:
            outputs.append((h * readout).sum(-1) if seed else torch.tanh((phi * readout).sum(-1)))
        if seed:
            phi = phi + 1.0
        if keep_states:
            states.append(h)
    out = torch.stack(outputs)
    return (out, torch.stack(states)) if keep_states else out


def initial_states(cfg: Config, trials: int, gen: torch.Generator, scale: float | None = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh random start for each trial: h0 = init_scale * N(0, 1), as rnn._init_hidden."""
    scale = cfg.init_scale if scale is None else scale
    return scale * torch.randn(trials, cfg.hidden_size, generator=gen, device=gen.device, dtype=dtype)


def validate(cfg: Config, params: population.Params, valid: tuple[Tensor, Tensor], gen: torch.Generator) -> Tensor:
    """Validation accuracy of every member [P] on the fixed validation set."""
    inputs, targets = valid
    with torch.no_grad():
        out = run(params, inputs, initial_states(cfg, inputs.shape[1], gen, dtype=inputs.dtype), cfg.dt, cfg.dynamics,
                  all_outputs=False)
    return accuracy(out[-1], targets)


class StopRule:
    """The seed's stop rule: the min of the last `window` validation accuracies >= `threshold`
    (its history starts as `window` zeros, so it never stops before `window` validations)."""

    def __init__(self, window: int, threshold: float, history: list[float] | None = None):
        self.window, self.threshold = window, threshold
        self.history = list(history or [])

    def add(self, value: float) -> None:
        self.history.append(float(value))

    @property
    def level(self) -> float:
        recent = self.history[-self.window:]
        return min(recent) if len(recent) == self.window else 0.0

    @property
    def met(self) -> bool:
        return self.level >= self.threshold


# ---- bptt ---------------------------------------------------------------------------------------------
def bptt_start(cfg: Config, ctx, gen: torch.Generator, state: dict | None):
    """A bptt run's validation set, network (a population of one), Adam and run state, fresh or restored."""
    device = gen.device
    valid = validation_set(cfg, str(device), ctx.seed)
    params = {k: v.clone().requires_grad_(k in cfg.trainable) for k, v in init_network(cfg, gen).items()}
    optimizer = torch.optim.Adam([params[k] for k in cfg.trainable], lr=cfg.learning_rate)
    run_state = {"step": 0, "history": [], "curve": [], "elapsed": 0.0}
    if state is not None:
        with torch.no_grad():
            for key in MATRICES:
                params[key].copy_(state["params"][key])
        optimizer.load_state_dict(state["optimizer"])
        run_state = state["run"]
        gen.set_state(state["generator"])  # after the init above drew from it
    return valid, params, optimizer, run_state


def train_bptt(cfg: Config, ctx, gen: torch.Generator, state: dict | None) -> dict:
    """Bptt.train: each epoch one batch of `batch_size` trials, loss summed over it, one Adam step on the
    `trainable` matrices (the seed: J_rec only), then validation."""
    valid, params, optimizer, run_state = bptt_start(cfg, ctx, gen, state)

    def one_step() -> float:
        inputs, targets = make_trials(cfg, cfg.batch_size, gen)
        out = run(params, inputs, initial_states(cfg, cfg.batch_size, gen), cfg.dt, cfg.dynamics, all_outputs=False)[:, 0]
        loss = trial_loss(out, targets).sum()  # the seed sums over the batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item() / cfg.batch_size

    def extra_state() -> dict:
        return {"optimizer": optimizer.state_dict()}

    return _loop(cfg, ctx, gen, run_state, one_step, lambda: validate(cfg, params, valid, gen)[0].item(),
                 lambda: _detached(params), extra_state)


# ---- ga -----------------------------------------------------------------------------------------------
def fitness(cfg: Config, pop: population.Params, inputs: Tensor, targets: Tensor, h0: Tensor) -> Tensor:
    """Mean loss over the batch of each member [P] (lower is fitter), one batched forward for all of them."""
    with torch.no_grad():
        out = run(pop, inputs, h0, cfg.dt, cfg.dynamics, all_outputs=False)
    return trial_loss(out, targets).mean(dim=-1)


def next_generation(cfg: Config, pop: population.Params, losses: Tensor, gen: torch.Generator) -> population.Params:
    """genetic.CreateDescendants on the device: the best member unmutated at index 0; every other child is a
    uniformly chosen one of the `parents` best plus mutation * N(0,1) on J_in, J_rec and J_out."""
    ranked = torch.argsort(losses)
    parents = ranked[:cfg.parents]
    picks = torch.randint(cfg.parents, (population.size(pop) - 1,), generator=gen, device=gen.device)
    chosen = torch.cat([parents[:1], parents[picks]])
    children = {key: value[chosen].clone() for key, value in pop.items()}
    for key in ("J_in", "J_rec", "J_out"):
        noise = torch.randn(children[key][1:].shape, generator=gen, device=gen.device)
        children[key][1:] += cfg.mutation * noise
    return children


def ga_start(cfg: Config, ctx, gen: torch.Generator, state: dict | None):
    """A GA run's validation set, population and run state, fresh or restored."""
    valid = validation_set(cfg, str(gen.device), ctx.seed)
    pop = init_network(cfg, gen, members=cfg.population_size)
    run_state = {"step": 0, "history": [], "curve": [], "elapsed": 0.0}
    if state is not None:
        pop = {k: v.to(gen.device) for k, v in state["population"].items()}
        run_state = state["run"]
        gen.set_state(state["generator"])  # after the init above drew from it
    return valid, pop, run_state


def train_ga(cfg: Config, ctx, gen: torch.Generator, state: dict | None) -> dict:
    """Genetic.train: each generation a batch of trials shared by all members (and one start state, as the
    seed's super-model), rank by mean loss, validate the best, breed the next generation."""
    valid, pop, run_state = ga_start(cfg, ctx, gen, state)
    best: dict[str, population.Params] = {"params": population.expand(population.member(pop, 0), 1)}
    losses_box: dict[str, Tensor] = {}

    def one_step() -> float:
        inputs, targets = make_trials(cfg, cfg.batch_size, gen)
        h0 = initial_states(cfg, 1, gen).expand(cfg.batch_size, cfg.hidden_size)  # one start for the batch
        losses = fitness(cfg, pop, inputs, targets, h0)
        losses_box["losses"] = losses
        winner = int(torch.argmin(losses))
        best["params"] = {k: v[winner:winner + 1].clone() for k, v in pop.items()}
        return losses[winner].item()

    def validate_best() -> float:
        accuracy_now = validate(cfg, best["params"], valid, gen)[0].item()
        pop.update(next_generation(cfg, pop, losses_box["losses"], gen))  # breed after validating, as the seed
        return accuracy_now

    return _loop(cfg, ctx, gen, run_state, one_step, validate_best,
                 lambda: {k: v[0] for k, v in best["params"].items()},
                 lambda: {"population": {k: v.cpu() for k, v in pop.items()}})


# ---- ff -----------------------------------------------------------------------------------------------
def rls_update(P: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """One recursive-least-squares step (FF_Demo.train_rdm): k = P r / (1 + r' P r), P <- P - (P r) k'.
    Returns the new P and the gain k (= new P @ r); each readout W then moves by W <- W - err k'."""
    Pr = P @ r
    k = Pr / (1.0 + r @ Pr)
    return P - torch.outer(Pr, k), k


def train_ff(cfg: Config, ctx, gen: torch.Generator, state: dict | None) -> dict:
    """full-FORCE (DePasquale 2017, as FF_Demo.py): a random target-generating network driven by the input,
    the target and a hint (= the target) gives each unit a target current; RLS trains the learner's J_rec
    to produce it and J_out to read +-1 (0 at t = 0), with P0 = I / alpha. J_in stays as initialised, J_rec
    and J_out start at 0, one trial at a time, validation on fresh trials after each."""
    device, f64 = gen.device, torch.float64
    H, I, dt = cfg.hidden_size, cfg.inputs, cfg.ff_dt / cfg.ff_tau
    if state is None:
        learner = {"J_in": 0.5 * torch.randn(H, I, generator=gen, device=device, dtype=f64),
                   "J_rec": torch.zeros(H, H, device=device, dtype=f64),
                   "J_out": torch.zeros(1, H, device=device, dtype=f64), "b": torch.zeros(H, device=device, dtype=f64)}
        teacher = {"J_in": 0.5 * torch.randn(H, I + 2, generator=gen, device=device, dtype=f64),
                   "J_rec": cfg.g / math.sqrt(H) * torch.randn(H, H, generator=gen, device=device, dtype=f64)}
        P = torch.eye(H, device=device, dtype=f64) / cfg.alpha
        run_state = {"step": 0, "history": [], "curve": [], "elapsed": 0.0}
    else:
        learner = {k: v.to(device) for k, v in state["learner"].items()}
        teacher = {k: v.to(device) for k, v in state["teacher"].items()}
        P, run_state = state["P"].to(device), state["run"]
        gen.set_state(state["generator"])
    box = {"P": P}

    def one_step() -> float:
        inputs, targets = make_trials(cfg, 1, gen, dtype=f64)
        u, target = inputs[:, 0], targets[0]
        x = cfg.ff_init_scale * torch.randn(H, generator=gen, device=device, dtype=f64)
        xd = cfg.ff_init_scale * torch.randn(H, generator=gen, device=device, dtype=f64)
        drive = torch.stack([target, target])  # target and hint columns, both the +-1 target (Ncontext.get_inps_and_targs)
        P, J, w, J_in = box["P"], learner["J_rec"], learner["J_out"], learner["J_in"]
        squared = []
        for t in range(len(u)):
            xd = xd + dt * (-xd + teacher["J_rec"] @ torch.tanh(xd) + teacher["J_in"] @ torch.cat([u[t], drive]))
            x = x + dt * (-x + J @ torch.tanh(x) + J_in @ u[t] + learner["b"])
            if t == 0 or (t >= cfg.ff_error_trigger and (t - cfg.ff_error_trigger) % cfg.ff_steps_per_update == 0):
                r, rd = torch.tanh(x), torch.tanh(xd)
                wanted = teacher["J_rec"] @ rd + teacher["J_in"][:, I:] @ drive  # the teacher's current minus its input
                J_err = J @ r - wanted
                w_err = w @ r - (0.0 if t == 0 else target)
                squared.append(float(w_err.square().sum()))
                P, k = rls_update(P, r)
                w = w - torch.outer(w_err, k)
                J = J - torch.outer(J_err, k)
        box["P"] = P
        learner["J_rec"], learner["J_out"] = J, w
        return sum(squared) / len(squared)

    def validate_fresh() -> float:
        # FF_Demo.ValidationScore: a fresh batch of trials each time, error when |y_T - target| > 1
        inputs, targets = make_trials(cfg, cfg.validation_trials, gen, dtype=f64)
        h0 = initial_states(cfg, cfg.validation_trials, gen, scale=cfg.ff_init_scale, dtype=f64)
        with torch.no_grad():
            out = run(population.expand(learner, 1), inputs, h0, dt, "tanh", all_outputs=False)
        return accuracy(out[-1, 0], targets).item()

    return _loop(cfg, ctx, gen, run_state, one_step, validate_fresh,
                 lambda: {k: v.float() for k, v in learner.items()},
                 lambda: {"learner": {k: v.cpu() for k, v in learner.items()},
                          "teacher": {k: v.cpu() for k, v in teacher.items()}, "P": box["P"].cpu()})


# ---- the loop every rule shares ---------------------------------------------------------------------------
def _detached(params: population.Params) -> dict[str, Tensor]:
    return {k: v.detach()[0] for k, v in params.items()}


class Diverged(ArithmeticError):
    """A step's loss is no longer finite (NaN or inf): the run has diverged and ends here."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss diverged to {value} at step {step}")
        self.step = step


class Progress:
    """What every rule's loop keeps for one run: the step, the stop rule, reports, checkpoints and the result.
    `_loop` drives one; learning_rules_fused drives a gang's, one batched step for all of them."""

    def __init__(self, cfg: Config, ctx, gen: torch.Generator, run_state: dict, matrices, extra_state):
        self.cfg, self.ctx, self.gen, self.run_state = cfg, ctx, gen, run_state
        self.matrices, self.extra_state = matrices, extra_state
        self.stop = StopRule(cfg.stop_window, cfg.stop_accuracy, run_state["history"])
        self.began = time.monotonic() - run_state["elapsed"]
        self.step = run_state["step"]

    @property
    def going(self) -> bool:
        return self.step < self.cfg.step_cap and not self.stop.met

    def checkpoint(self) -> None:
        self.ctx.save_checkpoint({
            "step": self.step, "rule": self.cfg.rule, "generator": self.gen.get_state(),
            "params": {k: v.cpu() for k, v in self.matrices().items()},
            "run": {"step": self.step, "history": self.stop.history, "curve": self.run_state["curve"],
                    "elapsed": time.monotonic() - self.began},
            **self.extra_state(),
        })

    def record(self, loss: float, accuracy: float) -> dict | None:
        """After a step and its validation: report, the divergence check, stop and checkpoint.
        Returns {"stopped_at": step} when the run must stop, else None."""
        cfg, ctx, stop = self.cfg, self.ctx, self.stop
        stop.add(accuracy)
        self.step += 1
        step = self.step
        if step % cfg.log_every == 0 or stop.met or step == cfg.step_cap:
            self.run_state["curve"].append([step, stop.history[-1]])
            ctx.report(step, loss=loss, val_accuracy=stop.history[-1], stop_accuracy=stop.level)
            ctx.progress(step, cfg.step_cap)
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        if ctx.should_stop():
            self.checkpoint()
            return {"stopped_at": step}
        if step % cfg.checkpoint_every == 0:
            self.checkpoint()
        return None

    def result(self) -> dict:
        self.checkpoint()
        stop = self.stop
        return {"steps": self.step, "converged": stop.met, "val_accuracy": stop.history[-1] if stop.history else 0.0,
                "stop_accuracy": stop.level, "accuracy_curve": self.run_state["curve"],
                "seconds": round(time.monotonic() - self.began, 3), "matrices": self.matrices()}


def _loop(cfg: Config, ctx, gen: torch.Generator, run_state: dict, one_step, validate_now, matrices, extra_state) -> dict:
    """step (an epoch, a generation or a trial) -> validate -> stop rule; report, checkpoint, stop when asked."""
    progress = Progress(cfg, ctx, gen, run_state, matrices, extra_state)
    while progress.going:
        loss = one_step()
        stopped = progress.record(loss, validate_now())
        if stopped is not None:
            return stopped
    return progress.result()


def save_matrices(path: Path, cfg: Config, matrices: dict[str, Tensor]) -> None:
    """An .npz a later analysis job reads: J_in [H,I], J_rec [H,H], J_out [1,H], b [H] (float32, column
    convention h' = (1-dt) h + dt (J_in u + J_rec phi(h) + b)), and dt, dynamics, rule, task, contexts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    dt = cfg.ff_dt / cfg.ff_tau if cfg.rule == "ff" else cfg.dt
    dynamics = "tanh" if cfg.rule == "ff" else cfg.dynamics
    np.savez(tmp, **{k: matrices[k].detach().cpu().float().numpy() for k in MATRICES},
             dt=np.float64(dt), dynamics=np.str_(dynamics), rule=np.str_(cfg.rule), task=np.str_(cfg.task),
             contexts=np.int64(cfg.contexts or 0), variance=np.float64(cfg.variance))
    tmp.replace(path)


def load_matrices(path: str | Path) -> dict[str, Any]:
    """The saved matrices and their settings as plain numpy values and strings."""
    with np.load(path) as data:
        return {k: (data[k].item() if data[k].ndim == 0 else data[k]) for k in data.files}


RULES = {"bptt": train_bptt, "ga": train_ga, "ff": train_ff}


def train(cfg: Config, ctx) -> dict:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)  # 50-unit nets: more threads than cores free cost far more than they give
    device = torch.device(ctx.device)
    gen = torch.Generator(device=device).manual_seed(ctx.seed)
    state = ctx.load_checkpoint()
    result = RULES[cfg.rule](cfg, ctx, gen, state)
    return result if "stopped_at" in result else finish(cfg, ctx, result)


def finish(cfg: Config, ctx, result: dict) -> dict:
    """A finished rule's result as the job's: the matrices saved to matrices.npz, their path in their place."""
    path = Path(ctx.workdir) / "matrices.npz"
    save_matrices(path, cfg, result.pop("matrices"))
    return {"rule": cfg.rule, "task": cfg.task, "contexts": cfg.contexts or 0, "variance": cfg.variance,
            **result, "matrices": str(path)}


def fuse_key(cfg: Config) -> str | None:
    """What the members of one batched forward (`learning_rules_fused.train_many`) must share: the rule, the
    task's and the network's shape, the batch and validation sizes, dt and the dynamics (and a GA's population
    size). Seeds, variance, mean, g, init_scale, the stop rule, the cap, lr and trainable (bptt), parents and
    mutation (ga) and the bookkeeping may differ. ff is never fused (None): full-FORCE runs one trial at a time
    with RLS on its own P matrix, nothing a stacked forward would share."""
    if cfg.rule == "ff":
        return None
    population_size = f"/P{cfg.population_size}" if cfg.rule == "ga" else ""
    return (f"learning_rules/{cfg.rule}{population_size}/{cfg.task}{cfg.contexts or ''}/H{cfg.hidden_size}"
            f"/T{cfg.trial_length}/B{cfg.batch_size}/V{cfg.validation_trials}/{cfg.dynamics}/dt{cfg.dt}")
