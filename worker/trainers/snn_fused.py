"""Fused training for snn_ddqn: K agents (K jobs), each with its own envs, replay buffer, RNG, nets and
optimizer, whose Q-network forward and backward passes run as one batched network.

How to read it: `train_many` builds one snn_ddqn.Agent per config (fused=True) and drives their loops
together. A member's loop (`Agent.run`) is the one snn_ddqn.train runs, a generator: where it needs its
networks it yields a request, ("act", obs) for greedy actions or ("learn", batch) for one update's
gradients; solo, the agent answers it with its own nets, here the gang answers it. Each round the gang answers every pending request at once:
`_act` runs one no-grad forward for all members that want actions, `_learn` one forward for the TD
targets and one forward + backward for the Q-values of all members that update; each member then takes
its own Adam step and target update (its own torch.optim.Adam and nets, the solo objects, so its
checkpoint is the solo format and it resumes solo or in a gang). Members run at their own pace (an
episode's end, a time limit, a stop), so a round holds whichever members asked. (Holding a request back
a round or two so that drifted members fall into step again was tried: on a CPU it was slower.) Solo and
fused runs share the loop, so a change to it reaches both; only the network computations are twice.

The batched network (`_forward`): each Linear is one `torch.baddbmm` over the members' stacked weights
(`_Linear`, whose backward forms the weight gradient as nn.Linear's does, grad^T @ x, not bmm's default
x^T @ grad, which rounds differently); the spiking layers are spiking/lif.py's LeakyLayer on the members'
rows laid end to end (elementwise: the same numbers). Members with different numbers of active lanes are
forwarded in separate groups, so each member's matmuls have its solo shapes. A batched matmul still may
round a last bit differently from the solo one at some small shapes (measured on this CPU: [8, 16] @
[16, 16] equal, [8, 16] @ [16, 2] not), so a member equals its solo run to float tolerance: the same episodes (greedy
actions, returns), losses to ~1e-7 and weights to float tolerance (tests/trainers/test_snn_fused.py);
one Q-value within an ulp of another would part the runs, as it would on another BLAS.

A member leaves on its own: its result, {"stopped_at": episodes} when its ctx.should_stop() (it
checkpoints first, as solo), or the exception its loop raised (a failed report, an env error); the rest
go on unchanged. Members may resume from different episodes: each loop restores its own checkpoint.
(gangs.py: the argument checks and member starts all fused trainers share.)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.trainers import gangs
from worker.trainers.snn_ddqn import Agent, Config, QNetwork, Request, fuse_key
from worker.trainers.spiking.lif import LeakyLayer

# On a CPU one batched update holds at most this many members x batch x widest layer: past it the spike
# trains ([T, members * batch, width]) fall out of the caches one member's fit in and the elementwise LIF
# work slows down more than the saved dispatch gains (measured, 1 thread, T 25: batch 100 x [64, 64] best
# at 2 members, batch 32 x [64, 64] at 4-8, batch 100 x [16] at 8). No cap on a GPU.
CPU_LEARN_ELEMENTS = 16_384


class _Linear(torch.autograd.Function):
    """x [K, B, in] @ weight[K]^T + bias[K]; the backward forms each gradient as nn.Linear's (grad^T @ x for
    the weight, a sum over rows for the bias), so each member's gradient is its solo one bit for bit."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class _Regroup(torch.autograd.Function):
    """A contiguous copy of x [A, C, rest...] as [C, A, rest...] whose gradient comes back contiguous too
    (a transposed view's gradient would be strided, and LeakyLayer's backward is several times slower on
    strided gradients). Moves between time-major spike trains [T, K, B, H] and member-major matmul
    inputs [K, T, B, H]."""

    @staticmethod
    def forward(ctx, x):
        return x.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(0, 1).contiguous()


def _layers(nets: list[QNetwork]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The members' Linear layers stacked: (weight [K, out, in], bias [K, out]); gradients flow back to
    each member's own parameters (outside no_grad)."""
    return [(torch.stack([n.linears[i].weight for n in nets]), torch.stack([n.linears[i].bias for n in nets]))
            for i in range(len(nets[0].linears))]


def _forward(net: QNetwork, layers, obs: torch.Tensor) -> torch.Tensor:
    """QNetwork.forward for K members: obs [K, B, obs_dim] -> Q [K, B, actions]. `net` (any member) gives
    the shared settings: architecture, time steps, readout, beta and threshold."""
    members, batch = obs.shape[:2]
    if not net.spiking:
        x = obs
        for w, b in layers[:-1]:
            x = F.relu(_Linear.apply(x, w, b))
        return _Linear.apply(x, *layers[-1])
    t_steps, last = net.t_steps, len(layers) - 1
    current = _Linear.apply(obs, *layers[0]).reshape(members * batch, -1)  # a constant current
    for i, (w, b) in enumerate(layers):
        if i > 0:  # all time steps of this layer's input in one batched matmul, rows [t, b] per member
            x = _Regroup.apply(spikes.view(t_steps, members, batch, -1)).view(members, t_steps * batch, -1)
            current = _Linear.apply(x, w, b).view(members, t_steps, batch, -1)
            current = _Regroup.apply(current).view(t_steps, members * batch, -1)
        readout = net.membrane_readout and i == last
        neuron = net.neurons[i]
        spikes, _mems, total = LeakyLayer.apply(current, neuron.beta.clamp(0, 1), neuron.threshold, t_steps,
                                                not readout, readout)
    q = total / t_steps if net.membrane_readout else spikes.sum(dim=0)
    return q.view(members, batch, -1)


def _by_rows(requests: list[tuple[Agent, torch.Tensor]]) -> list[list[tuple[Agent, torch.Tensor]]]:
    """Requests grouped by row count, so each member's matmuls keep the shapes of its solo run."""
    groups: dict[int, list] = {}
    for member, x in requests:
        groups.setdefault(x.shape[0], []).append((member, x))
    return list(groups.values())


@torch.no_grad()
def _act(requests: list[tuple[Agent, torch.Tensor]]) -> dict[int, np.ndarray]:
    """The greedy actions of every member that asked: one forward per row-count group."""
    out = {}
    for group in _by_rows(requests):
        nets = [m.online for m, _ in group]
        q = _forward(nets[0], _layers(nets), torch.stack([x for _, x in group]))
        for (m, _), best in zip(group, q.argmax(dim=2).cpu().numpy()):
            out[id(m)] = best
    return out


def _chunks(group: list, device: torch.device) -> list[list]:
    """The learners of one row-count group in batches that keep a CPU's working set in its caches."""
    if device.type != "cpu":
        return [group]
    member, obs = group[0]
    size = max(1, CPU_LEARN_ELEMENTS // (obs.shape[0] * max(member.cfg.hidden_layers)))
    return [group[i:i + size] for i in range(0, len(group), size)]


def _learn(requests: list[tuple[Agent, tuple]]) -> dict[int, float]:
    """One update's gradients for every member that asked (left in its parameters' .grad for its own
    optimizer.step), and its loss. The TD target is snn_ddqn.td_target's, per member."""
    out, batch_of = {}, {id(m): batch for m, batch in requests}
    groups = _by_rows([(m, batch[0]) for m, batch in requests])
    for group in [chunk for g in groups for chunk in _chunks(g, requests[0][0].device)]:
        members = [m for m, _ in group]
        batches = [batch_of[id(m)] for m in members]
        obs, actions, rewards, next_obs, terminated = (torch.stack(parts) for parts in zip(*batches))
        online, target = [m.online for m in members], [m.target for m in members]
        with torch.no_grad():
            next_q = _forward(target[0], _layers(target), next_obs)
            if any(m.cfg.target == "ddqn" for m in members):
                best = _forward(online[0], _layers(online), next_obs).argmax(dim=2, keepdim=True)
            ys = []
            for k, m in enumerate(members):
                value = next_q[k].gather(1, best[k]).squeeze(1) if m.cfg.target == "ddqn" else next_q[k].max(dim=1).values
                ys.append(rewards[k] + m.cfg.gamma * (1.0 - terminated[k]) * value)
        for m in members:
            m.optimizer.zero_grad(set_to_none=True)
        q = _forward(online[0], _layers(online), obs)
        losses = torch.stack([F.mse_loss(q[k].gather(1, actions[k].unsqueeze(1)).squeeze(1), ys[k])
                              for k in range(len(members))])
        losses.sum().backward()  # members share no parameter: each gets its solo gradient
        for m, loss in zip(members, losses.tolist()):
            out[id(m)] = loss
    return out


def train_many(cfgs: list[Config], ctxs: list) -> list[dict | Exception]:
    """Train same-fuse-key configs' agents together; each entry is that member's result (as `train` returns
    it, plus "fused": True), {"stopped_at": episodes}, or the exception that ended it."""
    gangs.check(cfgs, ctxs, fuse_key, "a network",
                unfused="snn_kernel 'snntorch' (the step-by-step reference) is not fused; use 'fused'")
    device = torch.device(ctxs[0].device if cfgs[0].device == "auto" else cfgs[0].device)
    outcome: list[dict | Exception | None] = [None] * len(cfgs)
    pending: dict[int, tuple[Agent, Request]] = {}
    loops = {}

    def advance(i: int, member: Agent, answer: Any) -> None:
        """Run member i's loop to its next request; a finished or failed member leaves."""
        try:
            request = loops[i].send(answer)
        except StopIteration as done:
            outcome[i] = done.value
            pending.pop(i, None)
        except Exception as exc:  # noqa: BLE001 - this member's failure ends this member only
            outcome[i] = exc
            pending.pop(i, None)
        else:
            pending[i] = (member, request)

    # an env that cannot be made fails its member only; one whose checkpoint cannot be read fails in advance
    for i, member in gangs.start(cfgs, ctxs, lambda cfg, ctx: Agent(cfg, ctx, device, fused=True), outcome):
        loops[i] = member.run()
        advance(i, member, None)
    while pending:  # each round answers every pending request: one batched compute per kind
        acts = [(m, x) for m, (kind, x) in pending.values() if kind == "act"]
        learns = [(m, batch) for m, (kind, batch) in pending.values() if kind == "learn"]
        answers = {**(_act(acts) if acts else {}), **(_learn(learns) if learns else {})}
        for i, (member, _request) in list(pending.items()):
            advance(i, member, answers[id(member)])
    return outcome
