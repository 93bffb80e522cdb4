"""Parameter budgets (seed 000's "Uniform" runners with `normal_size`): the hidden size that makes a
block description hold a given number of trainable parameters.

The seed solved a quadratic for a 3-block [x, h, y] frame. We count expected trainable entries block by
block (what `Description.expected_trainable` says: R=p gives p * rows * cols, S=n gives n, Row=n gives
n * rows, D gives min(rows, cols), trainable `true` the whole block, plus bias) and search the hidden
size whose count is closest to the budget: the same answer for the seed's frame, and it works for any
block types and any number of hidden blocks (each hidden block takes the same size).
"""
from __future__ import annotations

from collections.abc import Callable

from .blocks import Description


def with_hidden(desc: Description, hidden: int) -> Description:
    sizes = [desc.sizes[0]] + [hidden] * (len(desc.sizes) - 2) + [desc.sizes[-1]]
    return Description(sizes, desc.types, desc.inits, desc.trainable, desc.activations, desc.bias)


def hidden_for_budget(desc: Description, budget: int, largest: int = 1_000_000) -> int:
    """The hidden size (>= 1) whose expected trainable parameter count is closest to `budget`."""
    if len(desc.sizes) < 3:
        raise ValueError("param_budget needs at least one hidden block (row_sizes of 3 or more)")

    def count(h: int) -> float:
        return with_hidden(desc, h).expected_trainable()

    if count(largest) < budget:
        raise ValueError(f"param_budget {budget:,} is out of reach: even hidden size {largest:,} has fewer")
    return nearest_size(count, budget, largest)


def nearest_size(count: Callable[[int], float], budget: float, largest: int) -> int:
    """The size in 1..largest whose count is closest to `budget`, for a count non-decreasing in the size
    (1 when even that reaches it, `largest` when even that falls short)."""
    if count(1) >= budget:
        return 1
    if count(largest) < budget:
        return largest
    lo, hi = 1, largest  # count(lo) < budget <= count(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) < budget:
            lo = mid
        else:
            hi = mid
    return lo if budget - count(lo) <= count(hi) - budget else hi
