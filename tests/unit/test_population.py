"""worker/trainers/population.py: a stacked population computes what its members compute one by one."""
from __future__ import annotations

import pytest
import torch

from worker.trainers import population


def _params(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(4, generator=generator)}


def test_the_batched_linear_equals_each_members_own_matmul():
    generator = torch.Generator().manual_seed(0)
    members = [_params(generator) for _ in range(5)]
    stacked = population.stack(members)
    x = torch.randn(5, 7, 3, generator=generator)
    out = population.linear(x, stacked["w"], stacked["b"])
    assert out.shape == (5, 7, 4) and population.size(stacked) == 5
    for index, params in enumerate(members):
        torch.testing.assert_close(out[index], x[index] @ params["w"] + params["b"])
        assert torch.equal(population.member(stacked, index)["w"], params["w"])
    torch.testing.assert_close(population.linear(x, stacked["w"])[2], x[2] @ members[2]["w"])


def test_expand_makes_identical_members_without_copying():
    params = _params(torch.Generator().manual_seed(1))
    many = population.expand(params, 4)
    assert many["w"].shape == (4, 3, 4) and many["w"].data_ptr() == params["w"].data_ptr()
    assert all(torch.equal(many["b"][i], params["b"]) for i in range(4))


def test_members_with_different_parameters_are_refused_by_name():
    generator = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="member 1 has parameters"):
        population.stack([_params(generator), {"w": torch.zeros(3, 4)}])
    with pytest.raises(ValueError, match="at least one member"):
        population.stack([])


def test_concat_stacks_several_populations_and_gives_each_its_slice_back():
    generator = torch.Generator().manual_seed(3)
    first = population.stack([_params(generator) for _ in range(2)])
    second = population.stack([_params(generator) for _ in range(3)])
    whole, slices = population.concat([first, second])
    assert population.size(whole) == 5 and slices == [slice(0, 2), slice(2, 5)]
    for pop, members in zip((first, second), slices):
        for key in pop:
            assert torch.equal(population.part(whole, members)[key], pop[key])
    with pytest.raises(ValueError, match="member 2 has parameters"):
        population.concat([first, {"w": torch.zeros(1, 3, 4)}])
