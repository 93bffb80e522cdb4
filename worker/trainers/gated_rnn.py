"""gated_rnn: seed 001's systematic gated-RNN exploration (ASFaust/SLMfun), one readable file.

Byte-level next-byte prediction, cross-entropy in nats/byte. Model: embed(256 -> state) -> n_layers x
GatedLayer -> Linear(state -> 256). No BPTT: the recurrent state is detached after every step, and the
optimizer steps once per time step. `batch_size` streams read windows of `history` bytes at random
offsets; the state resets at each window. The logged loss is the seed's moving average
(0.95 * avg + 0.05 * loss, starting from 3.0), reported every `log_every` steps.

`steps_mode`: "exact" stops at `steps`; "finish_window" ends where the seed's loop does, at the end of the
window that passes `steps` (10,000 asked, windows of 999 steps: 11 windows = 10,989 steps, and a curve of
10,989 // 50 = 219 points, as in the seed's result files). `external_id` is the seed's config id, stored
with each job so old result files can be joined with ours (worker/trainers/slmfun.py reads those files).
`fuse_key` names the configs that gated_fused.py's `train_many` trains as one stacked model (a gang).
"""
from __future__ import annotations

import functools
import math
import sysconfig
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from torch import nn

from worker.trainers import slmfun

VOCAB = 256
STDLIB_CORPUS = "stdlib"


class Diverged(ArithmeticError):
    """The moving-average loss is no longer finite (NaN or inf): the run has diverged and ends here."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss diverged to {value} at step {step} (try a smaller lr)")
        self.step = step


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # The seven flags of the seed's grid.
    use_input_gate: bool = False
    use_forget_gate: bool = True
    use_output_gate: bool = False
    use_state_gate: bool = True
    use_new_state: bool = True
    use_old_state: bool = False
    use_residual: bool = True
    n_layers: int = Field(default=2, ge=1, le=16)
    state_size: int = Field(default=256, ge=1, le=8192)
    # Training, as in the seed: batch 256, window 1000, 10,000 steps, Adam lr 1e-3.
    batch_size: int = Field(default=256, ge=1, le=65_536, validation_alias=AliasChoices("batch_size", "batch"))
    history: int = Field(default=1000, ge=2, validation_alias=AliasChoices("history", "history_size", "history_len", "window"))
    steps: int = Field(default=10_000, ge=1, validation_alias=AliasChoices("steps", "n_steps", "training_steps"))
    steps_mode: Literal["exact", "finish_window"] = "exact"
    lr: float = Field(default=1e-3, gt=0.0, le=10.0, validation_alias=AliasChoices("lr", "learning_rate"))
    # "stdlib" (the Python standard library's sources: on every machine) or a path, e.g. to enwik8.
    corpus: str = STDLIB_CORPUS
    corpus_bytes: int = Field(default=10_000_000, ge=10_000)
    log_every: int = Field(default=50, ge=1, validation_alias=AliasChoices("log_every", "log_frequency"))
    checkpoint_every: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _needs_a_state_output(self):
        if not (self.use_new_state or self.use_old_state):
            raise ValueError("use_new_state and use_old_state are both false: the output would see no state")
        return self

    @property
    def end_step(self) -> int:
        """The step training ends at: `steps`, or the end of the window that reaches it (the seed's)."""
        if self.steps_mode == "exact":
            return self.steps
        per_window = self.history - 1
        return -(-self.steps // per_window) * per_window


def external_id(cfg: Config) -> str:
    """The seed's config id (init_experiments.py): sha256 of its sorted-keys JSON of the nine RNN keys."""
    return slmfun.seed_config_id(cfg.model_dump(include=set(slmfun.RNN_KEYS)))


def fuse_key(cfg: Config) -> str:
    """What the members of one stacked model (`train_many`) must share: the shape, the data and the run
    length. Gate flags, lr, log_every and checkpoint_every may differ: the seed's 432 configs are 6 keys."""
    return (f"gated_rnn/L{cfg.n_layers}/S{cfg.state_size}/B{cfg.batch_size}/H{cfg.history}/end{cfg.end_step}"
            f"/{cfg.corpus}:{cfg.corpus_bytes}")


def dataset_name(corpus: str) -> str:
    """What the seed's results call the dataset ("enwik8" for ../../datasets/enwik8.txt)."""
    return STDLIB_CORPUS if corpus == STDLIB_CORPUS else Path(corpus).stem


class GatedLayer(nn.Module):
    """As the seed's RNNLayer. x' and s' are the input and the old state, each scaled by its input gate
    when there is one. new = tanh(W[x', s']); the state gate mixes it with the old state,
    z = sig(Wz[x', s', new]), new = z * new + (1 - z) * s; the forget gate then scales the state,
    new = sig(Wf[x', s', new]) * new. The output layer reads new and/or s', plus x when residual
    (concatenated, not added: "not a true residual" in the seed), then goes through the output gate
    o * sig(Wo[o, inputs]), or swish when there is none. `new` is the next state."""

    def __init__(self, size: int, cfg: Config):
        super().__init__()
        self.cfg = cfg
        both, reads = 2 * size, size * (int(cfg.use_new_state) + int(cfg.use_old_state) + int(cfg.use_residual))
        self.candidate = nn.Linear(both, size)
        self.input_gate = nn.Linear(both, both) if cfg.use_input_gate else None  # x and s gates in one
        self.state_gate = nn.Linear(both + size, size) if cfg.use_state_gate else None
        self.forget_gate = nn.Linear(both + size, size) if cfg.use_forget_gate else None
        self.readout = nn.Linear(reads, size)
        self.output_gate = nn.Linear(size + reads, size) if cfg.use_output_gate else None

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.cat([x, state], dim=-1)
        if self.input_gate is not None:
            xs = xs * torch.sigmoid(self.input_gate(xs))
        new = torch.tanh(self.candidate(xs))
        if self.state_gate is not None:
            z = torch.sigmoid(self.state_gate(torch.cat([xs, new], dim=-1)))
            new = z * new + (1.0 - z) * state
        if self.forget_gate is not None:
            new = torch.sigmoid(self.forget_gate(torch.cat([xs, new], dim=-1))) * new
        parts = ([new] if self.cfg.use_new_state else []) + ([xs[..., state.shape[-1]:]] if self.cfg.use_old_state else [])
        reads = torch.cat(parts + ([x] if self.cfg.use_residual else []), dim=-1)
        y = self.readout(reads)
        y = y * torch.sigmoid(self.output_gate(torch.cat([y, reads], dim=-1))) if self.output_gate is not None else F.silu(y)
        return y, new


class GatedRNN(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Linear(VOCAB, cfg.state_size)  # the seed's Linear(256 -> state), its init included
        self.layers = nn.ModuleList(GatedLayer(cfg.state_size, cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.state_size, VOCAB)

    def forward(self, byte: torch.Tensor, states: list[torch.Tensor]):
        x = self.embed.weight.t()[byte] + self.embed.bias  # = embed(one_hot(byte)), without the matmul
        new_states = []
        for layer, state in zip(self.layers, states):
            x, state = layer(x, state)
            new_states.append(state)
        return self.head(x), new_states


@functools.cache
def stdlib_sources() -> tuple[Path, ...]:
    """The stdlib's .py files in path order. Listing them walks the whole tree (0.4-0.6 s on the 2-core VM,
    where reading the first 200 kB of them takes 1 ms), so the warm process lists them once (`prewarm`) and
    every job it forks reads the list it inherited."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # Installed packages live under the stdlib folder too; they differ between machines, so skip them.
    return tuple(sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)))


def prewarm() -> None:
    """Called by the warm process (worker/warm.py) before it forks job children: no tensor operation."""
    stdlib_sources()


def load_corpus(corpus: str, max_bytes: int) -> torch.Tensor:
    """The corpus as a uint8 tensor: a file's first `max_bytes`, or the stdlib's sources in path order."""
    if corpus == STDLIB_CORPUS:
        chunks, size = [], 0
        for path in stdlib_sources():
            data = path.read_bytes()
            chunks.append(data)
            size += len(data)
            if size >= max_bytes:
                break
        raw = b"".join(chunks)[:max_bytes]
    else:
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file '{corpus}' not found (use corpus: stdlib for the built-in one)")
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def train(cfg: Config, ctx) -> dict:
    device = torch.device(ctx.device)
    torch.manual_seed(ctx.seed)
    data = load_corpus(cfg.corpus, cfg.corpus_bytes).to(device)
    if len(data) < cfg.history:
        raise ValueError(f"corpus has {len(data)} bytes; it needs at least history={cfg.history}")
    model = GatedRNN(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = torch.Generator().manual_seed(ctx.seed)

    state = ctx.load_checkpoint()
    if state is None:
        state = {"step": 0, "window_pos": 0, "starts": None, "hidden": None, "avg": 3.0,
                 "min_loss": float("inf"), "curve": [], "elapsed": 0.0, "start_time": time.time()}
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
    step, pos, starts, hidden = state["step"], state["window_pos"], state["starts"], state["hidden"]
    avg = torch.tensor(state["avg"], device=device)
    min_loss, curve = state["min_loss"], state["curve"]
    hidden = [h.to(device) for h in hidden] if hidden is not None else None
    began = time.monotonic() - state["elapsed"]
    start_time = state.get("start_time", time.time())  # wall clock of the first attempt's start, as the seed's
    end = cfg.end_step

    def checkpoint() -> None:
        ctx.save_checkpoint({
            "step": step, "window_pos": pos, "starts": starts, "hidden": [h.cpu() for h in hidden],
            "avg": float(avg), "min_loss": min_loss, "curve": curve, "elapsed": time.monotonic() - began,
            "start_time": start_time,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": sampler.get_state(), "torch_rng": torch.get_rng_state(),
        })

    while step < end:
        if pos == 0:  # a new window: fresh offsets, state reset
            starts = torch.randint(0, len(data) - cfg.history + 1, (cfg.batch_size,), generator=sampler)
            hidden = [torch.zeros(cfg.batch_size, cfg.state_size, device=device) for _ in range(cfg.n_layers)]
        index = starts.to(device) + pos
        logits, hidden = model(data[index], hidden)
        loss = F.cross_entropy(logits, data[index + 1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hidden = [h.detach() for h in hidden]  # no BPTT
        avg = 0.95 * avg + 0.05 * loss.detach()
        step += 1
        pos = (pos + 1) % (cfg.history - 1)  # a window of `history` bytes holds history - 1 predictions
        on_log = step % cfg.log_every == 0
        if on_log or step == end:
            value = float(avg)
            # The seed's curve holds only the every-log_every points (and a run shorter than that, its end).
            if on_log or cfg.steps_mode == "exact" or not curve:
                min_loss = min(min_loss, value)
                curve.append([step, value])
            ctx.report(step, loss=value, raw_loss=loss.item())
            ctx.progress(step, end)
            if not math.isfinite(value):  # checked at log points only: no device sync on every step
                raise Diverged(step, value)
        if step % cfg.checkpoint_every == 0 or ctx.should_stop():
            checkpoint()
            if ctx.should_stop():
                return {"stopped_at": step}
    # What the seed's result file holds, in our names: times, batch size, history size, dataset.
    return {
        "min_loss": min_loss, "final_loss": float(avg), "steps": step, "steps_asked": cfg.steps,
        "steps_mode": cfg.steps_mode, "loss_curve": curve, "seconds": round(time.monotonic() - began, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "start_time": start_time, "end_time": time.time(), "batch_size": cfg.batch_size,
        "history_size": cfg.history, "dataset": dataset_name(cfg.corpus),
    }
