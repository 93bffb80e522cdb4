"""Seed 000's baselines, in the same [x, h, y] frame as the block model: forward(x [B, T, n_in]) ->
y [B, T, n_out], the y block after each step, so one data and loss path serves every model type.

- lstm: one layer, proj_size = output size. In the frame, h is the LSTM's cell state and y its
  (projected) hidden state, which is both the output and part of the next step's state (as the seed's
  IterativeLSTM lays it out).
- rnn / gru: one layer; y is the hidden state, as in the seed, when hidden_size == output size. The seed
  required that; we also allow another hidden size and then read y through a linear layer.
- mlp: the seed's `from_MLP`: a block model whose only blocks are dense, trainable and just below the
  diagonal (layer k feeds layer k+1), so an input reaches y len(sizes) - 1 iterations later.

Running the torch module over the whole sequence at once equals iterating it one step at a time (the
seed's loop) and is much faster.

`baseline_parameters` counts what torch will build; `hidden_for_parameters` picks the hidden size whose
count is closest to a budget (the trainer passes the block description's own count, so a baseline in a
grid beside it is compared at the same size). `ReadUnits` reads only some units of y (seed 000's GRU.yaml
has y = the hidden 130 and its loss reads the last 10).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import BlockRNN, Description
from .sampling import nearest_size


class LSTMBaseline(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        proj = output_size if output_size < hidden_size else 0  # torch needs proj_size < hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=1, batch_first=True, proj_size=proj)
        # A projection of 0 means y = the hidden state; read it through a linear layer when sizes differ.
        self.readout = nn.Linear(hidden_size, output_size) if proj == 0 and hidden_size != output_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return y if self.readout is None else self.readout(y)


class RecurrentBaseline(nn.Module):
    def __init__(self, kind: str, input_size: int, hidden_size: int, output_size: int):
        super().__init__()
        cls = nn.GRU if kind == "gru" else nn.RNN
        self.rnn = cls(input_size, hidden_size, num_layers=1, batch_first=True)
        self.readout = nn.Linear(hidden_size, output_size) if hidden_size != output_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return h if self.readout is None else self.readout(h)


def mlp_description(sizes: list[int], activations: list[str] | None, bias: bool = True) -> Description:
    """The block description of the seed's MLP: W blocks at (k + 1, k), initialised as nn.Linear's
    weights, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), trainable; everything else 0 and frozen."""
    n = len(sizes)
    types = [[0] * n for _ in range(n)]
    inits: list[list[object]] = [[0] * n for _ in range(n)]
    train: list[list[object]] = [[False] * n for _ in range(n)]
    for k in range(n - 1):
        bound = 1.0 / math.sqrt(sizes[k])
        types[k + 1][k] = "W"
        inits[k + 1][k] = f"U={-bound},{bound}"
        train[k + 1][k] = True
    acts = activations or (["Identity"] + ["ReLU"] * (n - 2) + ["Identity"])
    return Description.parse(sizes, types, inits, train, acts, bias)


def build_baseline(model_type: str, input_size: int, hidden_size: int, output_size: int, gen: torch.Generator,
                   sizes: list[int] | None = None, activations: list[str] | None = None,
                   bias: bool = True) -> nn.Module:
    if model_type == "lstm":
        return LSTMBaseline(input_size, hidden_size, output_size)
    if model_type in ("gru", "rnn"):
        return RecurrentBaseline(model_type, input_size, hidden_size, output_size)
    if model_type == "mlp":
        sizes = sizes or [input_size, hidden_size, output_size]
        return BlockRNN(mlp_description(sizes, activations, bias), "dense", gen)
    raise ValueError(f"unknown baseline '{model_type}'")


def baseline_parameters(model_type: str, input_size: int, hidden_size: int, output_size: int) -> int:
    """Trainable parameters of the lstm / gru / rnn baseline these classes build (both torch biases)."""
    h, n_in, n_out = hidden_size, input_size, output_size
    if model_type == "lstm":
        proj = n_out if n_out < h else 0
        recurrent = proj or h
        count = 4 * h * (n_in + recurrent) + 8 * h + proj * h
        return count + (h * n_out + n_out if proj == 0 and h != n_out else 0)
    gates = {"gru": 3, "rnn": 1}[model_type]
    return gates * h * (n_in + h) + 2 * gates * h + (h * n_out + n_out if h != n_out else 0)


def hidden_for_parameters(model_type: str, input_size: int, output_size: int, budget: int,
                          largest: int = 100_000) -> int:
    """The hidden size (>= 1) whose baseline parameter count is closest to `budget`."""
    def count(h: int) -> int:
        return baseline_parameters(model_type, input_size, h, output_size)

    return nearest_size(count, budget, largest)


class ReadUnits(nn.Module):
    """y[..., start:stop] of a model's output: the units seed 000's loss idx_list reads."""

    def __init__(self, model: nn.Module, start: int, stop: int):
        super().__init__()
        self.model, self.start, self.stop = model, start, stop

    @classmethod
    def around(cls, model: nn.Module, units: tuple[int, int] | None) -> nn.Module:
        return model if units is None else cls(model, *units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[..., self.start : self.stop]
