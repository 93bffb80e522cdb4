"""Fused training for perturbation (seed 003): a gang of same-shape configs, every member's probes of an epoch
in one stacked forward.

How to read it: `train_many` builds each member's `perturbation.Run` (the object `train` drives: its data,
weights, generator, checkpoint and bookkeeping) and runs one gang per epoch the members resume from (a gang
joins only members at the same epoch), one after the other (gangs.py: the bookkeeping all fused trainers
share). `_gang` is the epoch loop: `_step` evaluates the
probes of all members at once, then each member updates, reports, checkpoints, stops and finishes exactly as
its solo run does (`Run.record`, `Run.finish`); a member that diverges, stops or fails leaves, the rest go on.

`_step` per method: wp and spsa stack every member's weight vectors (M members x (P + 1) sets, P = its
perturbations) as the rows of one stacked forward (`_losses`; on a GPU up to members_per_forward rows a
forward, on a CPU as many as stay in its cache, CPU_FORWARD_BYTES), np stacks
the members' noisy copies and their noise, bptt stacks the members' weights as autograd leaves; each member's
share of the losses becomes its gradient through the trainer's own estimate (perturbation.wp_estimate, ...),
with its own sigma and its own generator's directions or noise. Members are independent rows of batched
matmuls, so each one's numbers equal its solo run to float tolerance and a NaN in one cannot touch another.

Data: when every member's sequences are the same (the seed's case: one fixed sine wave; the seed and the
learning rate do not change it) all rows read one shared batch; otherwise each row reads its member's own
(a different amplitude, frequency, random phase or noise), through the same forward.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from worker.trainers import gangs
from worker.trainers import perturbation as pt
from worker.trainers import population
from worker.trainers.perturbation import Config, Run, fuse_key

# On a CPU a forward whose [T, rows, B, H] states outgrow the cache runs ~1.5x slower a row (bench/README.md,
# perturbation.py --part fused): wp's 462 rows of the seed's net, T 100, fill 7.4 MB, so a gang's rows go in
# forwards of about one member's. A GPU takes the whole stack (up to members_per_forward rows) at once.
CPU_FORWARD_BYTES = 8 << 20


def _same_data(runs: list[Run]) -> bool:
    first = runs[0].data
    return all(r.data.keys() == first.keys() and all(torch.equal(r.data[k], first[k]) for k in first) for r in runs)


class _Batch:
    """Each split's inputs and targets for rows of the stack whose members are `owner` (a row index)."""

    def __init__(self, runs: list[Run], shared: bool):
        self.shared = shared
        self.pairs = runs[0].pairs if shared else {
            split: tuple(torch.stack([r.pairs[split][i] for r in runs]) for i in (0, 1)) for split in runs[0].pairs}

    def rows(self, split: str, owner: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T, I] shared by every row, or each row's member's own [rows, B, T, I]."""
        x, y = self.pairs[split]
        return (x, y) if self.shared else (x[owner], y[owner])

    def member(self, split: str, index: int) -> Tensor:
        x = self.pairs[split][0]
        return x if self.shared else x[index]


def _losses(vectors: Tensor, owner: Tensor, like: pt.Params, batch: _Batch, chunk: int) -> Tensor:
    """The training loss of every row's weight vector, scored on its member's data, in forwards of <= chunk rows."""
    out = []
    for start in range(0, len(vectors), chunk):
        rows = slice(start, start + chunk)
        out.append(pt.elman_losses(pt.unflatten(vectors[rows], like), *batch.rows("train", owner[rows])))
    return torch.cat(out)


def _owners(counts: list[int], device: torch.device) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))


def _slices(counts: list[int]) -> list[slice]:
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _rows_per_forward(runs: list[Run]) -> int:
    rows = min(r.tc.members_per_forward for r in runs)
    if runs[0].device.type != "cpu":
        return rows
    x = runs[0].pairs["train"][0]
    per_row = x.shape[0] * x.shape[1] * runs[0].cfg.model.hidden_size * runs[0].cfg.model.num_layers * x.element_size()
    return max(1, min(rows, CPU_FORWARD_BYTES // per_row))


def _step(runs: list[Run], batch: _Batch) -> tuple[list[Tensor], Tensor, list[int]]:
    """One epoch's gradient for every member: (gradients, the unperturbed training losses [M], forwards each)."""
    tc = runs[0].tc
    method, device = tc.gradient_computation, runs[0].device
    if method == "bptt":
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in population.stack([r.params for r in runs]).items()}
        with torch.enable_grad():  # the loop runs under no_grad
            losses = pt.elman_losses(leaves, *batch.rows("train", torch.arange(len(runs), device=device)))
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))  # members share no weight
        return [torch.cat([g[m].reshape(-1) for g in grads]) for m in range(len(runs))], losses.detach(), [1] * len(runs)
    if method == "np":
        return _np_step(runs, batch)
    probes = []
    for r in runs:
        w = pt.flatten(r.params)
        if method == "wp":
            probes.append((pt.wp_vectors(w, r.tc.perturbation), None))
        else:
            probes.append(pt.spsa_vectors(w, r.tc.perturbation, r.tc.num_directions, r.generator))
    counts = [len(vectors) for vectors, _ in probes]
    chunk = _rows_per_forward(runs)
    losses = _losses(torch.cat([vectors for vectors, _ in probes]), _owners(counts, device), runs[0].params, batch, chunk)
    grads, base = [], []
    for r, (_, d), rows in zip(runs, probes, _slices(counts)):
        mine = losses[rows]
        sigma = r.tc.perturbation
        grads.append(pt.wp_estimate(mine, sigma) if method == "wp" else pt.spsa_estimate(mine, d, sigma))
        base.append(mine[0])
    return grads, torch.stack(base), counts


def _np_step(runs: list[Run], batch: _Batch) -> tuple[list[Tensor], Tensor, list[int]]:
    """Node perturbation: each member's clean run and noisy copies, its own noise, one stacked forward."""
    noises = [pt.np_noise(r.params, batch.member("train", m), r.tc.perturbation, r.tc.num_directions, r.generator)
              for m, r in enumerate(runs)]
    counts = [r.tc.num_directions + 1 for r in runs]
    stacked = {k: torch.cat([population.expand(r.params, n)[k] for r, n in zip(runs, counts)]) for k in runs[0].params}
    noise = [torch.cat(layer) for layer in zip(*(member_noise for _, member_noise in noises))]
    y, states = pt.elman_forward(stacked, batch.rows("train", _owners(counts, runs[0].device))[0], noise,
                                 keep_states=True)
    losses = pt.sequence_loss(y, batch.rows("train", _owners(counts, runs[0].device))[1])
    grads = []
    for m, (r, (draws, _), rows) in enumerate(zip(runs, noises, _slices(counts))):
        grads.append(pt.np_estimate(r.params, batch.member("train", m), draws, losses[rows],
                                    [layer[rows] for layer in states], r.tc.perturbation))
    return grads, torch.stack([losses[rows][0] for rows in _slices(counts)]), counts


def _gang(runs: list[Run]) -> dict[int, dict | Exception]:
    """Train these runs (all at one epoch) to their ends; each one's outcome by its index in `runs`."""
    outcome: dict[int, dict | Exception] = {}
    active = list(range(len(runs)))
    for i in list(active):
        if runs[i].done:  # resumed from its last checkpoint: nothing left but the result
            _finish(runs, i, outcome, active)
    shared = bool(active) and _same_data([runs[i] for i in active])
    with torch.no_grad():
        while active:
            started = time.monotonic()
            members = [runs[i] for i in active]
            batch = _Batch(members, shared)
            grads, train_losses, forwards = _step(members, batch)
            arange = torch.arange(len(members), device=members[0].device)
            val_losses = pt.elman_losses(population.stack([r.params for r in members]), *batch.rows("val", arange))
            for i, grad, train_loss, val_loss, count in zip(list(active), grads, train_losses.tolist(),
                                                            val_losses.tolist(), forwards):
                r = runs[i]
                try:
                    lr = pt.learning_rate(r.tc, r.state["epoch"])
                    r.params = pt.update(r.tc, r.params, grad, lr)
                    stopped = r.record(train_loss, val_loss, count, lr, started)
                except Exception as exc:  # noqa: BLE001 - a diverged or failed member ends itself only
                    outcome[i] = exc
                    active.remove(i)
                    continue
                if stopped is not None:
                    outcome[i] = stopped
                    active.remove(i)
                elif r.done:
                    _finish(runs, i, outcome, active)
    return outcome


def _finish(runs: list[Run], i: int, outcome: dict, active: list[int]) -> None:
    outcome[i] = gangs.finished(runs[i].finish)
    active.remove(i)


def train_many(cfgs: list[Config], ctxs: list) -> list[dict | Exception]:
    """Train same-fuse-key configs in stacked forwards; each entry is that member's result (as `train` returns
    it, plus "fused": True), {"stopped_at": epoch}, or the exception that ended it."""
    gangs.check(cfgs, ctxs, fuse_key, "a forward")
    if cfgs[0].training.num_threads:
        torch.set_num_threads(cfgs[0].training.num_threads)
    outcome: dict[int, dict | Exception] = {}
    gangs.by_start(gangs.start(cfgs, ctxs, Run, outcome), lambda run: run.state["epoch"], _gang, outcome)
    return [outcome[i] for i in range(len(cfgs))]
