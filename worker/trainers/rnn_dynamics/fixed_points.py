"""Fixed and slow points of a trained network, for each constant input (Sussillo & Barak 2013, as the seed).

How to read it: `conditions` makes the constant inputs, `find` is the search, `Point` and `Condition` what
it returns. For every input condition at once (one batch: conditions x starts), minimise

    q(h) = 0.5 |F(h) - h|^2 = 0.5 dt^2 |v(h)|^2

where F is the network's one-step map at that constant input and v the continuous-time velocity: its zeros
are the zeros of the seed's `GetF` (which returns dt v). Adam from many states taken from trial trajectories
finds the minima; Newton steps on v with the closed-form Jacobian (accepted only where they lower q) then
polish true zeros to machine precision. q < `fixed_tol`: a fixed point; q < `slow_tol`: a slow point (a
local minimum of q that is no zero); the rest never settled and are dropped. Points closer than the
dedup radius are one point (the lowest q kept, not the mean: a mean of fixed points need not be one).
Stability, as the seed tests it by iterating the map from nearby states: eigenvalues mu of dF/dh;
unstable dimensions = #|mu| > 1; none: stable, all: unstable (a source), some: saddle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from worker.trainers.rnn_dynamics.network import Network

SIGNAL_MEAN = 0.1857  # learning_rules.SIGNAL_MEAN: the task's largest signal, the default +- levels


@dataclass
class Point:
    state: np.ndarray  # [H]
    q: float
    unstable_dims: int
    kind: str  # stable | saddle | unstable
    max_abs_eig: float  # the largest |mu| of dF/dh: > 1 grows, < 1 decays
    fixed: bool  # q < fixed_tol (else a slow point)

    def as_dict(self, with_state: bool = True) -> dict:
        out = {"kind": self.kind, "unstable_dims": self.unstable_dims, "q": self.q,
               "max_abs_eig": self.max_abs_eig, "fixed": self.fixed}
        if with_state:
            out["state"] = [round(float(x), 6) for x in self.state]
        return out


@dataclass
class Condition:
    label: str
    input: np.ndarray  # [I]
    fixed: list[Point] = field(default_factory=list)
    slow: list[Point] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for p in self.fixed if p.kind == kind)

    @property
    def counts(self) -> dict[str, int]:
        return {"stable": self.count("stable"), "saddle": self.count("saddle"),
                "unstable": self.count("unstable"), "slow": len(self.slow)}


def conditions(inputs: int, contexts: int, levels: Sequence[float] = (-SIGNAL_MEAN, 0.0, SIGNAL_MEAN),
               rdm: bool = False) -> tuple[list[str], np.ndarray]:
    """The constant inputs to analyse: for CDI, each context k with its own signal channel at each level and
    the other signals 0 (the seed's context_fixed_points); for RDM the one channel at each level."""
    if rdm:
        if inputs != 1:
            raise ValueError(f"an RDM network has 1 input, this one has {inputs}")
        return [f"{level:+.3g}" for level in levels], np.array([[level] for level in levels], dtype=np.float64)
    if inputs != 2 * contexts:
        raise ValueError(f"a CDI network with {contexts} contexts has {2 * contexts} inputs, this one has {inputs}")
    labels, rows = [], []
    for k in range(contexts):
        for level in levels:
            u = np.zeros(inputs)
            u[k], u[contexts + k] = level, 1.0
            labels.append(f"ctx{k + 1} {level:+.3g}")
            rows.append(u)
    return labels, np.array(rows)


def q_value(net: Network, h: Tensor, u: Tensor) -> Tensor:
    """q(h) = 0.5 |F(h) - h|^2 per state: [..., H] -> [...]."""
    return 0.5 * (net.step(h, u) - h).square().sum(-1)


def q_gradient(net: Network, h: Tensor, u: Tensor) -> Tensor:
    """dq/dh = dt^2 (dv/dh)' v = dt^2 (phi'(h) * (v J_rec) - v) for row states [..., H]."""
    v = net.velocity(h, u)
    return net.dt ** 2 * ((v @ net.J_rec) * (1.0 - torch.tanh(h) ** 2) - v)


def find(net: Network, labels: Sequence[str], inputs: np.ndarray, starts: np.ndarray, *, iterations: int = 600,
         lr: float = 0.05, newton_steps: int = 25, fixed_tol: float = 1e-12, slow_tol: float = 1e-6,
         dedup: float = 1e-2, slow_dedup: float = 0.5) -> list[Condition]:
    """Fixed and slow points of `net` for each row of `inputs` [C, I], searched from every state of
    `starts` [S, H] (the same starts for every condition). One batch of C x S states throughout."""
    dtype = net.J_rec.dtype
    u = torch.as_tensor(inputs, dtype=dtype).unsqueeze(1)  # [C, 1, I]
    h = torch.as_tensor(starts, dtype=dtype).unsqueeze(0).repeat(len(inputs), 1, 1)  # [C, S, H]
    h = _descend(net, h, u, iterations, lr)
    h = _polish(net, h, u, newton_steps)
    with torch.no_grad():
        q = q_value(net, h, u)
    found = []
    for c, label in enumerate(labels):
        condition = Condition(label, np.asarray(inputs[c], dtype=np.float64))
        order = torch.argsort(q[c])
        qs, states = q[c][order], h[c][order]
        fixed_mask = qs < fixed_tol
        slow_mask = (qs >= fixed_tol) & (qs < slow_tol)
        fixed_states, fixed_q = _unique(states[fixed_mask], qs[fixed_mask], dedup)
        slow_states, slow_q = _unique(states[slow_mask], qs[slow_mask], slow_dedup)
        condition.fixed = _classify(net, fixed_states, fixed_q, fixed=True)
        # a slow point that sits on a fixed point is that fixed point, not a second finding
        slow_keep = [i for i in range(len(slow_states))
                     if not len(fixed_states) or torch.cdist(slow_states[i:i + 1], fixed_states).min() >= slow_dedup]
        condition.slow = _classify(net, slow_states[slow_keep], slow_q[slow_keep], fixed=False)
        found.append(condition)
    return found


def _descend(net: Network, h: Tensor, u: Tensor, iterations: int, lr: float) -> Tensor:
    """Adam on q over all states at once, with q's closed-form gradient (no autograd graph: a third of the
    time of backward on these sizes); the rate decays 100x over the run so slow points settle."""
    m, s = torch.zeros_like(h), torch.zeros_like(h)
    beta1, beta2, eps = 0.9, 0.999, 1e-12
    decay = 0.01 ** (1.0 / max(1, iterations))
    for t in range(1, iterations + 1):
        grad = q_gradient(net, h, u)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        s.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = lr * decay ** (t - 1) * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        h = h - step * m / (s.sqrt() + eps)
    return h


def _polish(net: Network, h: Tensor, u: Tensor, steps: int) -> Tensor:
    """Damped Newton on v(h) = 0, batched: a state takes the step (or half of it, ...) only if q drops."""
    with torch.no_grad():
        q = q_value(net, h, u)
        for _ in range(steps):
            v = net.velocity(h, u)
            try:
                delta = torch.linalg.solve(net.velocity_jacobian(h), v.unsqueeze(-1)).squeeze(-1)
            except torch.linalg.LinAlgError:  # a singular Jacobian somewhere: lstsq handles every state
                delta = torch.linalg.lstsq(net.velocity_jacobian(h), v.unsqueeze(-1)).solution.squeeze(-1)
            delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)
            improved = torch.zeros_like(q, dtype=torch.bool)
            for scale in (1.0, 0.5, 0.25, 0.125):
                trial = h - scale * delta
                q_trial = q_value(net, trial, u)
                take = (q_trial < q) & ~improved
                h = torch.where(take.unsqueeze(-1), trial, h)
                q = torch.where(take, q_trial, q)
                improved |= take
            if not improved.any():
                break
    return h


def _unique(states: Tensor, qs: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Greedy: states come sorted by q; each joins the first kept state within `radius`, else is kept."""
    kept: list[int] = []
    for i in range(len(states)):
        if kept and torch.cdist(states[i:i + 1], states[kept]).min() < radius:
            continue
        kept.append(i)
    return states[kept], qs[kept]


def _classify(net: Network, states: Tensor, qs: Tensor, fixed: bool) -> list[Point]:
    if len(states) == 0:
        return []
    moduli = torch.linalg.eigvals(net.map_jacobian(states)).abs()  # [K, H]
    points = []
    for state, q, mu in zip(states, qs, moduli):
        unstable = int((mu > 1.0 + 1e-9).sum())
        kind = "stable" if unstable == 0 else ("unstable" if unstable == net.units else "saddle")
        points.append(Point(state.cpu().numpy(), float(q), unstable, kind, float(mu.max()), fixed))
    return points
