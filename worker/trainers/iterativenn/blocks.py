"""Seed 000's block description model: one masked linear map over the state z = [x | h ... | y].

A description is a grid of blocks. `row_sizes` and `col_sizes` are equal (the map takes z to z), the first
block is the input x, the last the output y, those between are hidden. Per block:

- type (what entries exist):  `0` none, `W` all, `D` the diagonal, `R=p` each entry with probability p,
  `S=n` exactly n distinct random entries, `Row=n` exactly n distinct random entries in each row.
  (The seed drew S and Row entries with replacement, so it could get fewer; we draw without, so a block
  holds what it promises and the densities the grid reports are the ones trained.)
- initialisation (the values of those entries): `0`, `1`, `C=v`, `G` / `G=mu,sigma` (Gaussian, default
  0,1), `U` / `U=a,b` (uniform, default -1,1).
- trainable: `true` (every entry of the block learns, the absent ones too, starting from 0),
  `false` (frozen), `non-zero` (the entries whose initial value W0 is not 0 learn, as in the seed: a
  `non-zero` block initialised `0` learns nothing). A `0` block must not be trainable (the seed asserts
  it; we refuse it naming the block).

The effective weight is W = W0 + U * mask (W0 the initial values, frozen; U the update, starting at 0;
mask the trainable entries), plus a bias. One step of the model is z <- act(W z + b), after the input
was inserted into the x block; per block-row activations (Identity, ReLU, Sigmoid, ELU, Tanh).

`bias`: true / false for every block row, or one flag per block row (seed 000's sequential2D files
set a bias per block; `seed_files.py` turns them into these flags).

The first block-row never matters: the x block is overwritten by the next input before anything reads it
and the loss reads only y. So we compute only the rows below it (the seed requires it be zero and frozen;
we accept anything there and ignore it, saying so in `describe()`).

Two representations of the same map, chosen by density (`choose_representation`):
- "dense": W0, U and mask as dense [rows, N] tensors, W built once per sequence, one matmul per step.
- "sparse": only the entries that exist (W0 != 0 or trainable) as a CSR matrix; U is a vector over them.
  Forward is a CSR @ dense matmul; backward is a CSR^T @ dense matmul for the state and a sampled
  dense-dense product (torch.sparse.sampled_addmm) for the values, so no step ever touches N^2 numbers.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Trainable = Literal[True, False, "non-zero"]
Representation = Literal["dense", "sparse"]

# bench/sparse_vs_dense.py, forward + backward + Adam over a 10-step sequence, batch 16, on the 2-core
# development VM shared with other work (bench/README.md has the tables): sparse CSR beat masked dense
# at hidden 1000 up to 5-10% density (1.1-5x faster) and lost from 20% on; at hidden 3000 it won up to
# 10% (1.2-5.6x) and lost from 20-50% on; at hidden 300 a step is 10-30 ms either way and the runs did
# not agree, so sparse only below 2%. Sparse when density < the threshold for the state size:
SPARSE_BELOW_CPU = ((500, 0.02), (1500, 0.10), (math.inf, 0.15))  # (state size up to, density below)
# Not measured on a GPU yet (this task had none): dense matmuls there cost microseconds at these sizes,
# so dense everywhere until bench/sparse_vs_dense.py --device cuda says otherwise; `representation:
# sparse` forces it.
SPARSE_BELOW_CUDA = ((math.inf, 0.0),)

ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "tanh": nn.Tanh}


# ---- parsing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockType:
    kind: Literal["0", "W", "D", "R", "S", "Row"]
    arg: float = 0.0  # p for R, n for S and Row

    def expected_entries(self, rows: int, cols: int) -> float:
        """How many entries this type creates in a rows x cols block (exact except for R)."""
        if self.kind == "0" or rows == 0 or cols == 0:
            return 0.0
        if self.kind == "W":
            return float(rows * cols)
        if self.kind == "D":
            return float(min(rows, cols))
        if self.kind == "R":
            return self.arg * rows * cols
        if self.kind == "S":
            return float(min(int(self.arg), rows * cols))
        return float(rows * min(int(self.arg), cols))  # Row


@dataclass(frozen=True)
class Init:
    kind: Literal["0", "1", "C", "G", "U"]
    a: float = 0.0
    b: float = 0.0

    @property
    def always_zero(self) -> bool:
        """Every value is 0 (`0`, `C=0`, `G=0,0`, `U=0,0`): a `non-zero` block with it learns nothing."""
        return self.kind == "0" or (self.kind != "1" and self.a == 0.0 and self.b == 0.0)


def _number_list(text: str, count: int, what: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != count:
        raise ValueError(f"{what} needs {count} number(s) after '=', got '{text}'")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what}: '{text}' is not a number list") from None


def parse_block_type(value: Any) -> BlockType:
    text = str(value).strip()
    if text in ("0", "0.0", "False", "None"):
        return BlockType("0")
    if text in ("W", "D"):
        return BlockType(text)  # type: ignore[arg-type]
    match = re.fullmatch(r"(Row|R|S)\s*=\s*(.+)", text)
    if not match:
        raise ValueError(f"unknown block type '{text}'; use 0, W, D, R=p, S=n or Row=n")
    kind, arg = match.group(1), match.group(2)
    (number,) = _number_list(arg, 1, f"block type {kind}")
    if kind == "R":
        if not 0.0 <= number <= 1.0:
            raise ValueError(f"block type '{text}': R=p needs 0 <= p <= 1")
        return BlockType("R", number)
    if number < 0 or number != int(number):
        raise ValueError(f"block type '{text}': {kind}=n needs a whole n >= 0")
    return BlockType(kind, float(int(number)))  # type: ignore[arg-type]


def parse_init(value: Any) -> Init:
    if isinstance(value, bool):
        value = int(value)
    text = str(value).strip()
    if text in ("0", "0.0"):
        return Init("0")
    if text in ("1", "1.0"):
        return Init("1")
    if text == "G":
        return Init("G", 0.0, 1.0)
    if text == "U":
        return Init("U", -1.0, 1.0)
    match = re.fullmatch(r"([CGU])\s*=\s*(.+)", text)
    if not match:
        raise ValueError(f"unknown initialisation '{text}'; use 0, 1, C=v, G, G=mu,sigma, U or U=a,b")
    kind, arg = match.group(1), match.group(2)
    if kind == "C":
        (v,) = _number_list(arg, 1, "initialisation C")
        return Init("C", v)
    a, b = _number_list(arg, 2, f"initialisation {kind}")
    if kind == "G" and b < 0:
        raise ValueError(f"initialisation '{text}': sigma must be >= 0")
    if kind == "U" and b < a:
        raise ValueError(f"initialisation '{text}': U=a,b needs a <= b")
    return Init(kind, a, b)  # type: ignore[arg-type]


def parse_trainable(value: Any) -> Trainable:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    if text in ("non-zero", "nonzero", "non_zero"):
        return "non-zero"
    raise ValueError(f"unknown trainable value '{value}'; use true, false or non-zero")


def parse_activation(value: Any) -> str:
    name = str(value).strip().lower()
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{value}'; use one of Identity, ReLU, Sigmoid, ELU, Tanh")
    return name


@dataclass
class Description:
    """A parsed, checked block description (sizes, per-block type/init/trainable, per-row activation)."""

    sizes: list[int]
    types: list[list[BlockType]]
    inits: list[list[Init]]
    trainable: list[list[Trainable]]
    activations: list[str]
    bias: bool | tuple[bool, ...] = True  # one flag for all block rows, or one per block row

    @classmethod
    def parse(cls, sizes: Sequence[int], block_types, initialization_types, trainable, activations,
              bias: bool = True) -> Description:
        n = len(sizes)
        if n < 2:
            raise ValueError("a description needs at least two blocks (x and y)")
        if any(int(s) < 1 for s in sizes):
            raise ValueError(f"block sizes must be >= 1, got {list(sizes)}")

        def grid(name, value, parse):
            if len(value) != n or any(len(row) != n for row in value):
                raise ValueError(f"{name} must be a {n}x{n} list of lists (one entry per block)")
            return [[parse(v) for v in row] for row in value]

        acts = [parse_activation(a) for a in activations]
        if len(acts) != n:
            raise ValueError(f"activations needs {n} entries (one per block row), got {len(acts)}")
        if isinstance(bias, (list, tuple)):
            if len(bias) != n:
                raise ValueError(f"bias needs {n} flags (one per block row) or one true/false, got {len(bias)}")
            bias = tuple(bool(b) for b in bias)
        else:
            bias = bool(bias)
        types = grid("block_types", block_types, parse_block_type)
        train = grid("trainable", trainable, parse_trainable)
        for i in range(n):
            for j in range(n):
                if types[i][j].kind == "0" and train[i][j] is not False:
                    raise ValueError(f"trainable[{i}][{j}] is {trainable[i][j]!r} but block_types[{i}][{j}] is 0: "
                                     "a 0 block has no entries to learn (seed 000 refuses it too); make it false")
        return cls([int(s) for s in sizes], types, grid("initialization_types", initialization_types, parse_init),
                   train, acts, bias)

    def row_has_bias(self, i: int) -> bool:
        return self.bias[i] if isinstance(self.bias, tuple) else self.bias

    @property
    def n(self) -> int:
        return sum(self.sizes)

    @property
    def input_size(self) -> int:
        return self.sizes[0]

    @property
    def output_size(self) -> int:
        return self.sizes[-1]

    def expected_trainable(self) -> float:
        """Expected trainable parameters of the computed rows (all block-rows but the first), bias included."""
        total = 0.0
        for i in range(1, len(self.sizes)):
            for j in range(len(self.sizes)):
                rows, cols, train = self.sizes[i], self.sizes[j], self.trainable[i][j]
                if train is True:
                    total += rows * cols
                elif train == "non-zero" and not self.inits[i][j].always_zero:
                    total += self.types[i][j].expected_entries(rows, cols)
            total += self.sizes[i] if self.row_has_bias(i) else 0
        return total

    def expected_density(self) -> float:
        """Expected fraction of the computed rows' entries that exist (W0 != 0 or trainable)."""
        exist = 0.0
        for i in range(1, len(self.sizes)):
            for j in range(len(self.sizes)):
                rows, cols = self.sizes[i], self.sizes[j]
                made = self.types[i][j].expected_entries(rows, cols)
                exist += rows * cols if self.trainable[i][j] is True else made
        return exist / ((self.n - self.sizes[0]) * self.n)


# ---- building the blocks --------------------------------------------------------------------------
def block_pattern(kind: BlockType, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """The bool [rows, cols] pattern of entries a block type creates."""
    if kind.kind == "0":
        return torch.zeros(rows, cols, dtype=torch.bool)
    if kind.kind == "W":
        return torch.ones(rows, cols, dtype=torch.bool)
    if kind.kind == "D":
        pattern = torch.zeros(rows, cols, dtype=torch.bool)
        k = torch.arange(min(rows, cols))
        pattern[k, k] = True
        return pattern
    if kind.kind == "R":
        return torch.rand(rows, cols, generator=gen) < kind.arg
    pattern = torch.zeros(rows, cols, dtype=torch.bool)
    n = int(kind.arg)
    if kind.kind == "S":  # n distinct cells of the whole block
        cells = torch.randperm(rows * cols, generator=gen)[: min(n, rows * cols)]
        pattern.view(-1)[cells] = True
        return pattern
    # Row: n distinct columns in each row (argsort of uniform noise = a random permutation per row)
    picks = torch.rand(rows, cols, generator=gen).argsort(dim=1)[:, : min(n, cols)]
    pattern.scatter_(1, picks, True)
    return pattern


def init_values(init: Init, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    if init.kind == "0":
        return torch.zeros(rows, cols)
    if init.kind == "1":
        return torch.ones(rows, cols)
    if init.kind == "C":
        return torch.full((rows, cols), init.a)
    if init.kind == "G":
        return torch.randn(rows, cols, generator=gen) * init.b + init.a
    return torch.rand(rows, cols, generator=gen) * (init.b - init.a) + init.a  # U


def build_matrices(desc: Description, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, mask) as dense [N - n_in, N] tensors for the computed rows (every block-row but the first).

    Blocks are drawn in row-major order from `gen`, so a seed gives the same network on every machine."""
    rows_out = []
    masks_out = []
    for i in range(1, len(desc.sizes)):
        w_row, m_row = [], []
        for j in range(len(desc.sizes)):
            r, c = desc.sizes[i], desc.sizes[j]
            pattern = block_pattern(desc.types[i][j], r, c, gen)
            values = init_values(desc.inits[i][j], r, c, gen) * pattern
            train = desc.trainable[i][j]
            # non-zero: the seed's rule, entries whose initial value is not 0 (values are 0 off the pattern)
            mask = torch.ones(r, c) if train is True else (values != 0).float() if train == "non-zero" else torch.zeros(r, c)
            w_row.append(values)
            m_row.append(mask)
        rows_out.append(torch.cat(w_row, dim=1))
        masks_out.append(torch.cat(m_row, dim=1))
    return torch.cat(rows_out, dim=0), torch.cat(masks_out, dim=0)


def choose_representation(density: float, size: int, device: str) -> Representation:
    table = SPARSE_BELOW_CUDA if str(device).startswith("cuda") else SPARSE_BELOW_CPU
    for up_to, below in table:
        if size <= up_to:
            return "sparse" if density < below else "dense"
    return "dense"


# ---- the CSR matmul with a backward that stays sparse ---------------------------------------------------
class _CSRMatmul(torch.autograd.Function):
    """out [R, B] = W @ zt, W a CSR matrix with fixed indices and `values` that need gradients."""

    @staticmethod
    def forward(ctx, values, zt, crow, col, crow_t, col_t, perm_t, rows, cols):
        ctx.save_for_backward(values, zt, crow, col, crow_t, col_t, perm_t)
        ctx.shape = (rows, cols)
        return torch.sparse_csr_tensor(crow, col, values, (rows, cols)) @ zt

    @staticmethod
    def backward(ctx, grad):
        values, zt, crow, col, crow_t, col_t, perm_t = ctx.saved_tensors
        rows, cols = ctx.shape
        grad = grad.contiguous()
        grad_values = grad_zt = None
        if ctx.needs_input_grad[0]:  # dL/dW_ij = sum_b grad_ib zt_jb, only where W has an entry
            pattern = torch.sparse_csr_tensor(crow, col, torch.zeros_like(values), (rows, cols))
            grad_values = torch.sparse.sampled_addmm(pattern, grad, zt.t().contiguous(), beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_zt = torch.sparse_csr_tensor(crow_t, col_t, values[perm_t], (cols, rows)) @ grad
        return grad_values, grad_zt, None, None, None, None, None, None, None


# ---- the model ----------------------------------------------------------------------------------------
class BlockRNN(nn.Module):
    """Seed 000's iterated block model. forward(x [B, T, n_in]) -> y [B, T, n_out] (the y block after
    each step). Parameters: `U` (and `bias`); W0 and mask are buffers, so they travel in checkpoints."""

    def __init__(self, desc: Description, representation: Representation, gen: torch.Generator):
        super().__init__()
        self.desc = desc
        self.representation = representation
        self.n_in, self.n_out, self.n = desc.input_size, desc.output_size, desc.n
        w0, mask = build_matrices(desc, gen)
        rows = w0.shape[0]
        flags = [desc.row_has_bias(i) for i in range(1, len(desc.sizes))]
        self.bias = nn.Parameter(torch.zeros(rows)) if any(flags) else None
        # Per-block-row flags (seed 000's sequential2D files): rows without a bias keep 0 and never learn.
        self.bias_mask = None if all(flags) or not any(flags) else torch.cat(
            [torch.full((desc.sizes[i],), float(flag)) for i, flag in zip(range(1, len(desc.sizes)), flags)])
        if self.bias is not None:  # as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn after the blocks
            bound = 1.0 / math.sqrt(self.n)
            with torch.no_grad():
                values = torch.rand(rows, generator=gen) * 2 * bound - bound
                self.bias.copy_(values if self.bias_mask is None else values * self.bias_mask)
            if self.bias_mask is not None:
                self.register_buffer("bias_rows", self.bias_mask.clone())  # forward multiplies: no gradient there
        # per-row activation segments of the computed rows
        self.segments = [(sum(desc.sizes[1:i]), desc.sizes[i], desc.activations[i]) for i in range(1, len(desc.sizes))]
        self.acts = nn.ModuleList(ACTIVATIONS[name]() for _, _, name in self.segments)
        if representation == "dense":
            self.register_buffer("W0", w0)
            self.register_buffer("mask", mask)
            self.U = nn.Parameter(torch.zeros_like(w0))
        else:
            exists = (w0 != 0) | (mask != 0)
            r, c = exists.nonzero(as_tuple=True)  # row-major order = CSR order
            self.register_buffer("crow", torch._convert_indices_from_coo_to_csr(r, rows))
            self.register_buffer("col", c)
            perm = (c * self.n + r).argsort()  # the same entries in column-major order: the CSR of W^T
            self.register_buffer("crow_t", torch._convert_indices_from_coo_to_csr(c[perm], self.n))
            self.register_buffer("col_t", r[perm])
            self.register_buffer("perm_t", perm)
            self.register_buffer("W0", w0[r, c].contiguous())
            self.register_buffer("mask", mask[r, c].contiguous())
            self.U = nn.Parameter(torch.zeros_like(self.W0))
        self.rows = rows

    # counts, for results and tests
    def trainable_parameters(self) -> int:
        biases = 0 if self.bias is None else self.rows if self.bias_mask is None else int(self.bias_mask.sum())
        return int(torch.count_nonzero(self.mask)) + biases

    def stored_entries(self) -> int:
        return int(self.W0.numel()) if self.representation == "sparse" else int(((self.W0 != 0) | (self.mask != 0)).sum())

    def effective_weight(self) -> torch.Tensor:
        """W0 + U * mask, as a dense [N - n_in, N] matrix (for tests and inspection)."""
        values = self.W0 + self.U * self.mask
        if self.representation == "dense":
            return values
        dense = torch.zeros(self.rows, self.n, device=values.device, dtype=values.dtype)
        r = torch.repeat_interleave(torch.arange(self.rows, device=values.device), self.crow.diff())
        dense[r, self.col] = values
        return dense

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        if all(name == "identity" for _, _, name in self.segments):
            return pre
        return torch.cat([act(pre[:, s : s + k]) for (s, k, _), act in zip(self.segments, self.acts)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        weight = self.W0 + self.U * self.mask  # once per sequence, not per step
        rest = torch.zeros(batch, self.rows, device=x.device, dtype=x.dtype)  # z below the x block
        outputs = []
        for t in range(steps):
            z = torch.cat([x[:, t], rest], dim=1)  # insert x into its block
            if self.representation == "dense":
                pre = z @ weight.t()
            else:
                pre = _CSRMatmul.apply(weight, z.t().contiguous(), self.crow, self.col, self.crow_t, self.col_t,
                                       self.perm_t, self.rows, self.n).t()
            if self.bias is not None:
                pre = pre + (self.bias if self.bias_mask is None else self.bias * self.bias_rows)
            rest = self._activate(pre)
            outputs.append(rest[:, -self.n_out :])
        return torch.stack(outputs, dim=1)

    def describe(self) -> dict[str, Any]:
        computed = self.rows * self.n
        return {"representation": self.representation, "state_size": self.n,
                "density": self.stored_entries() / computed, "trainable_parameters": self.trainable_parameters()}
