"""Seed 000's block descriptions: every block type and initialisation makes the entries and values it
promises (counted), the two representations are the same map, and parameter budgets solve correctly."""
from __future__ import annotations

import math

import pytest
import torch

from worker.trainers.iterativenn.blocks import (
    BlockRNN,
    Description,
    build_matrices,
    choose_representation,
    parse_block_type,
    parse_init,
    parse_trainable,
)
from worker.trainers.iterativenn.sampling import hidden_for_budget, with_hidden

pytestmark = pytest.mark.filterwarnings("ignore:.*[Ss]parse")  # CSR is "beta" in torch; we test it here


def one_block(kind, init="1", train="non-zero", rows=60, cols=50, seed=0):
    """A [x=cols, h=rows, y=1] description with the block under test at (h, x); everything else 0."""
    desc = Description.parse(
        [cols, rows, 1],
        [[0, 0, 0], [kind, 0, 0], [0, 0, 0]],
        [[0, 0, 0], [init, 0, 0], [0, 0, 0]],
        [[False] * 3, [train, False, False], [False] * 3],
        ["Identity"] * 3,
    )
    w0, mask = build_matrices(desc, torch.Generator().manual_seed(seed))
    return w0[:rows, :cols], mask[:rows, :cols], w0, mask


@pytest.mark.parametrize("kind, count", [
    ("W", 60 * 50), ("D", 50), ("S=7", 7), ("S=0", 0), ("S=5000", 60 * 50), ("Row=3", 60 * 3),
    ("Row=80", 60 * 50),
])
def test_block_types_make_exactly_the_entries_they_promise(kind, count):
    block, mask, w0, _ = one_block(kind)
    assert int((block != 0).sum()) == count
    assert int(mask.sum()) == count  # non-zero: exactly the created entries train
    assert int((w0 != 0).sum()) == count  # nothing leaks into other blocks
    if kind == "D":
        assert torch.equal(block, torch.eye(60, 50))
    if kind.startswith("Row"):
        assert ((block != 0).sum(dim=1) == min(int(kind[4:]), 50)).all()  # n in every row


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_random_blocks_have_density_p(p):
    rows, cols = 200, 150
    block, mask, _, _ = one_block(f"R={p}", rows=rows, cols=cols)
    n = rows * cols
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int((block != 0).sum()) - n * p) < 5 * sd  # binomial: 5 sigma
    assert torch.equal(mask, (block != 0).float())
    other, _, _, _ = one_block(f"R={p}", rows=rows, cols=cols, seed=1)
    assert not torch.equal(block != 0, other != 0)  # the seed picks the pattern


def test_initialisations_give_the_values_they_promise():
    assert torch.equal(one_block("W", "1")[0], torch.ones(60, 50))
    assert torch.equal(one_block("W", "C=0.3")[0], torch.full((60, 50), 0.3))
    assert torch.equal(one_block("W", "C=-2")[0], torch.full((60, 50), -2.0))
    g = one_block("W", "G=0.5,0.1", rows=200, cols=200)[0]
    assert abs(g.mean() - 0.5) < 0.005 and abs(g.std() - 0.1) < 0.005
    g0 = one_block("W", "G", rows=200, cols=200)[0]
    assert abs(g0.mean()) < 0.02 and abs(g0.std() - 1.0) < 0.02
    u = one_block("W", "U=-0.2,0.6", rows=200, cols=200)[0]
    assert u.min() >= -0.2 and u.max() <= 0.6 and abs(u.mean() - 0.2) < 0.01
    u0 = one_block("W", "U", rows=200, cols=200)[0]
    assert u0.min() >= -1 and u0.max() <= 1 and u0.min() < -0.9 and u0.max() > 0.9
    # values only where the type made entries
    s = one_block("S=9", "C=0.7")[0]
    assert sorted(set(s[s != 0].tolist())) == [pytest.approx(0.7)] and int((s != 0).sum()) == 9
    # `0` init with non-zero trainable: the seed's rule, only entries whose initial value is not 0 learn
    z, mask, _, _ = one_block("Row=2", "0")
    assert int((z != 0).sum()) == 0 and int(mask.sum()) == 0
    assert int(one_block("W", "C=0")[1].sum()) == 0
    assert int(one_block("W", "C=0.5")[1].sum()) == 60 * 50


@pytest.mark.parametrize("train", [True, "non-zero"])
def test_a_trainable_zero_block_is_refused_naming_it(train):
    with pytest.raises(ValueError, match=r"trainable\[1\]\[0\] .* block_types\[1\]\[0\] is 0"):
        one_block("0", "0", train)
    assert int(one_block("0", "0", False)[2].abs().sum()) == 0  # frozen: fine


def test_trainable_true_false_and_non_zero():
    _, mask_true, _, _ = one_block("R=0.1", "G=0,0.05", True)
    _, mask_false, _, _ = one_block("R=0.1", "G=0,0.05", False)
    block, mask_nz, _, _ = one_block("R=0.1", "G=0,0.05", "non-zero")
    assert int(mask_true.sum()) == 60 * 50  # the whole block, absent entries too
    assert int(mask_false.sum()) == 0
    assert torch.equal(mask_nz, (block != 0).float())


@pytest.mark.parametrize("text", ["R=1.5", "R=-0.1", "S=2.5", "Row=x", "Q", "R", "W=3"])
def test_bad_block_types_are_refused(text):
    with pytest.raises(ValueError):
        parse_block_type(text)


@pytest.mark.parametrize("text", ["G=1", "G=0,-1", "U=1,0", "C", "C=a", "X=1"])
def test_bad_initialisations_are_refused(text):
    with pytest.raises(ValueError):
        parse_init(text)


def test_parse_accepts_the_seed_spellings():
    assert parse_block_type(0).kind == "0" and parse_block_type("R=0.10").arg == 0.1
    assert parse_block_type("Row=15").arg == 15 and parse_block_type("S=3").kind == "S"
    assert parse_init(0).kind == "0" and parse_init(1).kind == "1" and parse_init("G=0,0.05").b == 0.05
    assert [parse_trainable(v) for v in (True, False, "non-zero", "True", "false")] == [True, False, "non-zero", True, False]
    with pytest.raises(ValueError):
        parse_trainable("sometimes")


def mixed_description() -> Description:
    return Description.parse(
        [5, 20, 3],
        [[0, 0, 0], ["R=0.3", "R=0.3", "S=4"], ["Row=2", "W", "D"]],
        [[0, 0, 0], ["G=0,0.5"] * 3, ["U=-1,1", "C=0.2", "1"]],
        [[False] * 3, ["non-zero", True, "non-zero"], ["non-zero", False, True]],
        ["Identity", "ReLU", "Tanh"],
    )


def test_dense_and_sparse_are_the_same_map_with_the_same_gradients():
    desc = mixed_description()
    dense = BlockRNN(desc, "dense", torch.Generator().manual_seed(1))
    sparse = BlockRNN(desc, "sparse", torch.Generator().manual_seed(1))
    exists = (dense.W0 != 0) | (dense.mask != 0)
    with torch.no_grad():
        dense.U.normal_()
        sparse.U.copy_(dense.U[exists])
    assert torch.allclose(dense.effective_weight(), sparse.effective_weight())
    assert dense.trainable_parameters() == sparse.trainable_parameters()
    x = torch.randn(4, 6, 5)
    out_dense, out_sparse = dense(x), sparse(x)
    assert out_dense.shape == (4, 6, 3)
    assert torch.allclose(out_dense, out_sparse, atol=1e-5)
    out_dense.pow(2).sum().backward()
    out_sparse.pow(2).sum().backward()
    assert torch.allclose(dense.U.grad[exists], sparse.U.grad, atol=1e-4)
    assert torch.allclose(dense.bias.grad, sparse.bias.grad, atol=1e-4)
    assert int((dense.U.grad * (1 - dense.mask)).abs().sum()) == 0  # frozen entries get no gradient
    assert sparse.describe()["density"] == pytest.approx(int(exists.sum()) / exists.numel())


def test_the_iteration_inserts_x_and_reads_y_each_step():
    """x -> h (identity-like D block), h -> y (D block): y at step t is x at step t - 1."""
    desc = Description.parse([3, 3, 3], [[0, 0, 0], ["D", 0, 0], [0, "D", 0]], [[0, 0, 0], [1, 0, 0], [0, 1, 0]],
                             [[False] * 3] * 3, ["Identity"] * 3, bias=False)
    model = BlockRNN(desc, "dense", torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 3)
    y = model(x)
    assert torch.allclose(y[:, 0], torch.zeros(2, 3))
    assert torch.allclose(y[:, 1:], x[:, :-1])
    assert model.trainable_parameters() == 0


def test_expected_trainable_and_the_budget_solver_match_the_seed_quadratic():
    """The seed's normal_size runner solved d01*h^2 + (d00*in + d02*out + d11*out)*h + d10*in*out + d12*out^2
    = budget for the RandomAnomaly frame [2500, h, 10], without biases."""
    dens = [[0.3, 0.5, 0.2], [0.7, 0.4, 0.9]]
    types = [[0, 0, 0]] + [[f"R={d}" for d in row] for row in dens]
    desc = Description.parse([2500, 7, 10], types, [[0] * 3] + [["G=0,0.05"] * 3] * 2,
                             [[False] * 3] + [["non-zero"] * 3] * 2, ["Identity", "ReLU", "Identity"], bias=False)
    budget = 50_000
    a = dens[0][1]
    b = dens[0][0] * 2500 + dens[0][2] * 10 + dens[1][1] * 10
    c = dens[1][0] * 2500 * 10 + dens[1][2] * 100 - budget
    seed_h = round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
    h = hidden_for_budget(desc, budget)
    assert abs(h - seed_h) <= 1
    sized = with_hidden(desc, h)
    assert abs(sized.expected_trainable() - budget) <= sized.expected_trainable() - with_hidden(desc, h - 1).expected_trainable()
    model = BlockRNN(sized, "sparse", torch.Generator().manual_seed(0))
    assert abs(model.trainable_parameters() - budget) < 0.02 * budget  # drawn close to expected
    with pytest.raises(ValueError, match="hidden block"):
        hidden_for_budget(Description.parse([3, 2], [[0, 0], ["W", "W"]], [[0, 0], ["1", "1"]],
                                            [[False] * 2, [True] * 2], ["Identity"] * 2), 100)


def test_representation_choice():
    assert choose_representation(1.0, 3000, "cpu") == "dense"
    assert choose_representation(0.01, 3000, "cpu") == "sparse"
    assert choose_representation(0.05, 1000, "cpu") == "sparse"
    assert choose_representation(0.5, 1000, "cpu") == "dense"
    assert choose_representation(0.05, 64, "cpu") == "dense"  # tiny: dense is cheap
    assert choose_representation(0.01, 3000, "cuda") == "dense"


@pytest.mark.parametrize("representation", ["dense", "sparse"])
def test_a_bias_per_block_row_leaves_unbiased_rows_at_zero(representation):
    """seed 000's sequential2D files set a bias per block: rows without one never get one."""
    desc = Description.parse([5, 4, 3], [[0] * 3, ["W"] * 3, ["W"] * 3], [[0] * 3, ["G=0,0.1"] * 3, ["G=0,0.1"] * 3],
                             [[False] * 3, [True] * 3, [True] * 3], ["Identity"] * 3, bias=[False, False, True])
    model = BlockRNN(desc, representation, torch.Generator().manual_seed(0))
    assert model.trainable_parameters() == 7 * 12 + 3
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 4, 5)).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(model.bias.grad[:4], torch.zeros(4)) and model.bias.grad[4:].abs().min() > 0
    # zero input and state: the first step's y is its own bias only; h (no bias) stays 0 and adds nothing
    x = torch.zeros(1, 2, 5)
    y = model(x)[0]
    w = model.effective_weight()
    assert torch.allclose(y[0], model.bias[4:])
    assert torch.allclose(y[1], w[4:, 9:] @ model.bias[4:] + model.bias[4:], atol=1e-6)
    with pytest.raises(ValueError, match="bias needs 3 flags"):
        Description.parse([5, 4, 3], [[0] * 3] * 3, [[0] * 3] * 3, [[False] * 3] * 3, ["Identity"] * 3, bias=[True])
