"""The one shape of data every sparse_rnn data source returns, and how the trainer batches it.

    SequenceData(train, validation, test, input_size, output_size, loss, sequence_position, ...)

- `train`, `validation`, `test`: lists of (x, y) pairs, one pair per sequence (an episode, a sample);
  any Sequence will do (len and indexing), e.g. one that builds samples lazily (anomaly.py does).
  x: float32 tensor [T, input_size]; T may differ between sequences (Minari episodes do).
  y: for loss "mse", float32 [T, output_size]; NaN entries are targets to skip (no loss there).
     for loss "cross_entropy", int64 [T] of class indices in [0, output_size); IGNORE (-100) = no target.
  With sequence_position "last" only y[T - 1] of each sequence is read (the rest may be anything valid).
- `loss`: "mse" (behaviour cloning: actions) or "cross_entropy" (classification: RandomAnomaly).
- `sequence_position`: "all" (loss at every step, seed 000's default) or "last" (only the final step).
- `name`: what the data is, for results ("random_anomaly", "D4RL/door/expert-v2").
- `info`: free-form facts for the result (e.g. a Minari dataset's own average return, its env id).

`batches` pads a list of pairs into [B, T_max, ...] tensors plus lengths; `pad` does one batch.
Sources build tensors on the CPU; the trainer moves batches to its device.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SequenceData:
    train: Sequence[Pair]
    validation: Sequence[Pair]
    test: Sequence[Pair]
    input_size: int
    output_size: int
    loss: Literal["mse", "cross_entropy"] = "mse"
    sequence_position: Literal["all", "last"] = "all"
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss not in ("mse", "cross_entropy"):
            raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {self.loss!r}")
        if self.sequence_position not in ("all", "last"):
            raise ValueError(f"sequence_position must be 'all' or 'last', got {self.sequence_position!r}")
        if not self.train:
            raise ValueError(f"{self.name or 'data'}: the training split is empty")
        x, y = self.train[0]
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"x must be [T, {self.input_size}], got {tuple(x.shape)}")
        want = 1 if self.loss == "cross_entropy" else 2
        if y.ndim != want or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be [T{', output_size' if want == 2 else ''}] with T = {x.shape[0]}, "
                             f"got {tuple(y.shape)}")


@dataclass
class Batch:
    x: torch.Tensor        # [B, T, input_size], zero-padded
    y: torch.Tensor        # [B, T, output_size] (NaN-padded) or [B, T] (IGNORE-padded)
    lengths: torch.Tensor  # [B] int64, the true length of each sequence

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device), self.y.to(device), self.lengths.to(device))


def pad(pairs: Sequence[Pair]) -> Batch:
    lengths = torch.tensor([x.shape[0] for x, _ in pairs], dtype=torch.long)
    steps = int(lengths.max())
    x0, y0 = pairs[0]
    x = torch.zeros(len(pairs), steps, x0.shape[1], dtype=torch.float32)
    if y0.dtype.is_floating_point:
        y = torch.full((len(pairs), steps, *y0.shape[1:]), float("nan"), dtype=torch.float32)
    else:
        y = torch.full((len(pairs), steps), IGNORE, dtype=torch.long)
    for i, (xi, yi) in enumerate(pairs):
        x[i, : xi.shape[0]] = xi
        y[i, : yi.shape[0]] = yi
    return Batch(x, y, lengths)


def batches(pairs: Sequence[Pair], batch_size: int, order: list[int] | None = None) -> Iterator[Batch]:
    """Consecutive batches of `pairs` in `order` (default: as stored); the last one may be smaller."""
    order = list(range(len(pairs))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield pad([pairs[i] for i in order[start : start + batch_size]])
