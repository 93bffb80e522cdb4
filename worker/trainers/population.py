"""Stacked parameters: P members' weights on a leading dimension, one batched forward for all of them.

A population (weight perturbation's P perturbed copies, a GA's P networks, K configs of a grid that share
a shape) is a dict of tensors whose first dimension is the member: `stack` builds it from P ordinary
parameter dicts and `member` reads one back. `linear` is the one batched matmul every stacked forward is
made of (`torch.baddbmm`: one kernel for all P members, never a Python loop over them). A trainer writes
its cell once over stacked tensors; a single network is a population of one.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

Params = dict[str, Tensor]


def stack(members: Sequence[Mapping[str, Tensor]]) -> Params:
    """P parameter dicts with the same keys and shapes -> one dict of [P, ...] tensors."""
    if not members:
        raise ValueError("a population needs at least one member")
    keys = list(members[0])
    for index, params in enumerate(members[1:], start=1):
        if list(params) != keys:
            raise ValueError(f"member {index} has parameters {sorted(params)}, member 0 has {sorted(keys)}")
    return {key: torch.stack([params[key] for params in members]) for key in keys}


def concat(populations: Sequence[Mapping[str, Tensor]]) -> tuple[Params, list[slice]]:
    """K stacked populations of one shape (configs of a grid that differ in seed, variance, sigma) as one
    population for one batched forward, and the slice of members each came from (`part` reads it back)."""
    if not populations:
        raise ValueError("concat needs at least one population")
    whole = stack([member(pop, i) for pop in populations for i in range(size(pop))])
    slices, start = [], 0
    for pop in populations:
        slices.append(slice(start, start + size(pop)))
        start += size(pop)
    return whole, slices


def part(population: Mapping[str, Tensor], members: slice) -> Params:
    """The members `members` of a stacked population (views), e.g. one config's share of a concat."""
    return {key: value[members] for key, value in population.items()}


def member(population: Mapping[str, Tensor], index: int) -> Params:
    """Member `index` of a stacked population (views, not copies)."""
    return {key: value[index] for key, value in population.items()}


def size(population: Mapping[str, Tensor]) -> int:
    """How many members a stacked population has."""
    return next(iter(population.values())).shape[0]


def expand(params: Mapping[str, Tensor], members: int) -> Params:
    """One parameter dict seen as a population of `members` identical members (views, no copies)."""
    return {key: value.unsqueeze(0).expand(members, *value.shape) for key, value in params.items()}


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [P, B, I] @ weight [P, I, O] (+ bias [P, O]) -> [P, B, O], one batched kernel for all members."""
    if bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(bias.unsqueeze(1), x, weight)
