"""Fused training for learning_rules (seed 004): a gang of same-shape bptt or GA configs, one batched forward
for all of them.

How to read it: `train_many` sets up each member as its solo run does (`bptt_start` / `ga_start`: its own
generator, validation set, network or population, restored from its own checkpoint) and runs one gang per
step the members resume from (a gang joins only members at the same step), one after the other (gangs.py:
the bookkeeping all fused trainers share). `_gang` is the loop: `_ga_step` or `_bptt_step` does one step
for every member at once, `_validate` validates all of them in one forward, then each member's `Progress`
(the object the solo loop drives) reports, checks its stop rule, checkpoints and stops exactly as its solo
run; a member that converges, reaches its cap, diverges, stops or fails leaves, the rest go on.

GA: the members' populations laid end to end ([sum of populations, N, N] weights), each population on its
own config's trials (learning_rules.run's grouped inputs); ranking, selection and mutation stay per member,
with its own generator and mutation. bptt: each member a population of one, the stacked weights built from
each member's own leaves (so each keeps its own Adam, lr and trainable matrices); the summed loss gives every
member its own gradient, members sharing no weight. Every member's random draws come from its own generator
in its solo order, so its numbers equal its solo run to float tolerance. ff is not fused (fuse_key None).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from worker.trainers import learning_rules as rules
from worker.trainers import gangs
from worker.trainers import population
from worker.trainers.learning_rules import Config, Progress, fuse_key


@dataclass
class _Member:
    cfg: Config
    ctx: Any
    gen: torch.Generator
    valid: tuple[Tensor, Tensor]
    progress: Progress | None = None
    pop: population.Params = field(default_factory=dict)  # ga: the population [P, ...]
    best: population.Params = field(default_factory=dict)  # ga: the last generation's best [1, ...]
    losses: Tensor | None = None  # ga: the last generation's fitness [P]
    params: population.Params = field(default_factory=dict)  # bptt: the network [1, ...], leaves
    optimizer: torch.optim.Optimizer | None = None  # bptt


def _start(cfg: Config, ctx, device: torch.device) -> _Member:
    """One member as its solo run starts it: generator, validation set, weights, run state (its checkpoint's)."""
    gen = torch.Generator(device=device).manual_seed(ctx.seed)
    state = ctx.load_checkpoint()
    if cfg.rule == "ga":
        valid, pop, run_state = rules.ga_start(cfg, ctx, gen, state)
        m = _Member(cfg, ctx, gen, valid, pop=pop, best=population.expand(population.member(pop, 0), 1))
        m.progress = Progress(cfg, ctx, gen, run_state, lambda: {k: v[0] for k, v in m.best.items()},
                              lambda: {"population": {k: v.cpu() for k, v in m.pop.items()}})
    else:
        valid, params, optimizer, run_state = rules.bptt_start(cfg, ctx, gen, state)
        m = _Member(cfg, ctx, gen, valid, params=params, optimizer=optimizer)
        m.progress = Progress(cfg, ctx, gen, run_state, lambda: rules._detached(m.params),
                              lambda: {"optimizer": m.optimizer.state_dict()})
    return m


def _trials(members: list[_Member]) -> tuple[Tensor, Tensor]:
    """Each member's batch of trials from its own generator: inputs [T, M, B, I], targets [M, B]."""
    trials = [rules.make_trials(m.cfg, m.cfg.batch_size, m.gen) for m in members]
    return torch.stack([x for x, _ in trials], dim=1), torch.stack([t for _, t in trials])


def _ga_step(members: list[_Member]) -> list[float]:
    """One generation's fitness for every population in one forward; each member's best loss."""
    cfg = members[0].cfg
    inputs, targets = _trials(members)
    size = cfg.population_size
    # one start state per member's batch, as the seed's super-model: [M * P, B, H]
    h0 = torch.stack([rules.initial_states(m.cfg, 1, m.gen).expand(cfg.batch_size, cfg.hidden_size) for m in members])
    whole = {k: torch.cat([m.pop[k] for m in members]) for k in members[0].pop}
    losses = rules.fitness(cfg, whole, inputs, targets.repeat_interleave(size, dim=0),
                        h0.repeat_interleave(size, dim=0)).view(len(members), size)
    winners = losses.argmin(dim=1)
    for m, row, winner in zip(members, losses, winners.tolist()):
        m.best = {k: v[winner:winner + 1].clone() for k, v in m.pop.items()}
        m.losses = row
    return losses.gather(1, winners.unsqueeze(1)).squeeze(1).tolist()


def _bptt_step(members: list[_Member]) -> list[float]:
    """One epoch for every member: its own trials, one stacked autograd forward, its own Adam step."""
    cfg = members[0].cfg
    inputs, targets = _trials(members)
    h0 = torch.stack([rules.initial_states(m.cfg, cfg.batch_size, m.gen) for m in members])
    stacked = {k: torch.cat([m.params[k] for m in members]) for k in rules.MATRICES}  # gradients reach each leaf
    out = rules.run(stacked, inputs, h0, cfg.dt, cfg.dynamics, all_outputs=False)
    losses = rules.trial_loss(out, targets).sum(dim=-1)  # the seed sums over the batch: [M]
    for m in members:
        m.optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()  # members share no weight: each gets its solo gradient
    for m in members:
        m.optimizer.step()
    return [value / cfg.batch_size for value in losses.detach().tolist()]


class _Validation:
    """The members' fixed validation sets stacked once ([T, M, V, I], [M, V]), again when members leave."""

    def __init__(self):
        self.ids: tuple[int, ...] = ()

    def sets(self, members: list[_Member]) -> tuple[Tensor, Tensor]:
        ids = tuple(id(m) for m in members)
        if ids != self.ids:
            self.ids = ids
            self.inputs = torch.stack([m.valid[0] for m in members], dim=1)
            self.targets = torch.stack([m.valid[1] for m in members])
        return self.inputs, self.targets


def _validate(members: list[_Member], nets: population.Params, valid: _Validation) -> list[float]:
    """Validation accuracy of one network per member [M], each on its own set from its own start states."""
    cfg = members[0].cfg
    inputs, targets = valid.sets(members)
    h0 = torch.stack([rules.initial_states(m.cfg, inputs.shape[2], m.gen, dtype=inputs.dtype) for m in members])
    with torch.no_grad():
        out = rules.run(nets, inputs, h0, cfg.dt, cfg.dynamics, all_outputs=False)
    return rules.accuracy(out[-1], targets).tolist()


def _gang(members: list[_Member]) -> dict[int, dict | Exception]:
    """Train these members (all at one step) to their ends; each one's outcome by its index in `members`."""
    outcome: dict[int, dict | Exception] = {}
    rows = {id(m): i for i, m in enumerate(members)}
    active = [m for m in members if _going(m, rows, outcome)]
    ga = members[0].cfg.rule == "ga"
    valid = _Validation()
    while active:
        losses = _ga_step(active) if ga else _bptt_step(active)
        if ga:
            accuracies = _validate(active, {k: torch.cat([m.best[k] for m in active]) for k in rules.MATRICES}, valid)
            for m in active:  # breed after validating, as the seed
                m.pop = rules.next_generation(m.cfg, m.pop, m.losses, m.gen)
        else:
            nets = {k: torch.cat([m.params[k].detach() for m in active]) for k in rules.MATRICES}
            accuracies = _validate(active, nets, valid)
        for m, loss, accuracy in zip(list(active), losses, accuracies):
            try:
                stopped = m.progress.record(loss, accuracy)
            except Exception as exc:  # noqa: BLE001 - a diverged or failed member ends itself only
                outcome[rows[id(m)]] = exc
                active.remove(m)
                continue
            if stopped is not None:
                outcome[rows[id(m)]] = stopped
                active.remove(m)
            elif not _going(m, rows, outcome):
                active.remove(m)
    return outcome


def _going(m: _Member, rows: dict[int, int], outcome: dict) -> bool:
    """True while the member trains on; once its stop rule or cap ends it, its result goes into `outcome`."""
    if m.progress.going:
        return True
    outcome[rows[id(m)]] = gangs.finished(lambda: rules.finish(m.cfg, m.ctx, m.progress.result()))
    return False


def train_many(cfgs: list[Config], ctxs: list) -> list[dict | Exception]:
    """Train same-fuse-key configs as one batched model; each entry is that member's result (as `train` returns
    it, plus "fused": True), {"stopped_at": step}, or the exception that ended it."""
    gangs.check(cfgs, ctxs, fuse_key, "a forward",
                unfused="ff configs are not fused (fuse_key None): train them one at a time")
    if cfgs[0].num_threads:
        torch.set_num_threads(cfgs[0].num_threads)
    device = torch.device(ctxs[0].device)
    outcome: dict[int, dict | Exception] = {}
    started = gangs.start(cfgs, ctxs, lambda cfg, ctx: _start(cfg, ctx, device), outcome)
    gangs.by_start(started, lambda m: m.progress.step, _gang, outcome)
    return [outcome[i] for i in range(len(cfgs))]
