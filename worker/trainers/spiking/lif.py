"""The spiking forward of snn_ddqn's Q-network, one layer at a time over all time steps.

snntorch's `Leaky` is one Python call per layer per time step (25 steps x 3 layers = 75 calls, each a
dozen small tensor ops and autograd nodes). Here the same numbers come from far fewer launches:

- a Linear layer's input for all `T` time steps is one matmul on the [T * batch, width] spike trains of
  the layer below (the first layer's input current is the same every step: computed once);
- the leaky-integrate-and-fire recurrence of a layer runs in one loop of four in-place ops per step, in
  the order snntorch does them (mem = beta * mem + input - reset * threshold; spike = mem > threshold;
  reset = the previous step's spike), so spikes and membranes equal `Leaky`'s for the same inputs;
- its backward is no loop at all: the reset is detached, as in snntorch, so dL/dmem is a linear
  recurrence in beta and the whole of it is one matmul with a [T, T] matrix of beta powers; the spike's
  surrogate gradient is snntorch's default ATan (alpha 2).

How to read it: `LeakyLayer` is one layer (forward loop, backward matmul); `spiking_forward` stacks the
layers as snn_ddqn's QNetwork does. tests/trainers/test_snn_ddqn.py checks both against snntorch.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

ATAN_ALPHA = 2.0  # snntorch's default surrogate: ATan with alpha 2


@functools.lru_cache(maxsize=16)
def _decay_matrix(beta: float, t_steps: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """D[t, k] = beta ** (k - t) for k >= t, else 0: g[t] = sum_k D[t, k] * direct[k] solves
    g[t] = direct[t] + beta * g[t + 1] (the backward of mem[t] = beta * mem[t - 1] + ...)."""
    steps = torch.arange(t_steps, dtype=torch.float64)
    power = steps.view(1, -1) - steps.view(-1, 1)
    decay = torch.where(power >= 0, beta ** power.clamp(min=0), 0.0)
    return decay.to(dtype=dtype, device=device)


def _integrate_torch(current, constant, beta, threshold, subtract, sum_mems, mems, spikes, total) -> None:
    """The recurrence, step by step, writing into `mems`, `spikes` (and `total`): four ops a step, in the
    order snntorch does them, so every value is the one `Leaky` computes."""
    thr = float(threshold)
    mem_at, spike_at = mems.unbind(0), spikes.unbind(0)
    current_at = [current] * len(mem_at) if constant else current.unbind(0)
    mem = torch.zeros_like(mem_at[0])
    for t, m in enumerate(mem_at):
        torch.mul(mem, beta, out=m)               # snntorch: beta.clamp(0, 1) * mem + input_ ...
        m.add_(current_at[t])
        if subtract and t > 0:
            m.sub_(spike_at[t - 1], alpha=thr)    # ... - reset * threshold (reset: the last step's spike)
        torch.gt(m, threshold, out=spike_at[t])   # fire: mem - threshold > 0
        if sum_mems:
            total.add_(m)
        mem = m


def _integrate_numpy(current, constant, beta, threshold, subtract, sum_mems, mems, spikes, total) -> None:
    """The same recurrence on the CPU through numpy views of the same memory: identical float32 ops
    (each one correctly rounded, none fused), a third of torch's per-call cost on these tiny arrays."""
    c, m_all, s_all, tot = current.numpy(), mems.numpy(), spikes.numpy(), total.numpy()
    b, thr = beta.numpy(), threshold.numpy()
    mem = np.zeros_like(m_all[0])
    for t in range(len(m_all)):
        m = m_all[t]
        np.multiply(mem, b, out=m)
        np.add(m, c if constant else c[t], out=m)
        if subtract and t > 0:
            np.subtract(m, s_all[t - 1] if thr == 1 else s_all[t - 1] * thr, out=m)
        np.greater(m, thr, out=s_all[t])
        if sum_mems:
            np.add(tot, m, out=tot)
        mem = m


class LeakyLayer(torch.autograd.Function):
    """Spikes and membranes [T, batch, width] of `Leaky(beta, threshold, reset_mechanism)` driven by
    `current`: [batch, width] (the same every step) or [T, batch, width], from mem = 0; and, with
    `sum_mems`, the membranes summed over time in time order (the membrane readout's sum, bit for bit)."""

    @staticmethod
    def forward(ctx, current: torch.Tensor, beta: torch.Tensor, threshold: torch.Tensor, t_steps: int,
                subtract: bool, sum_mems: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        constant = current.dim() == 2
        shape = current.shape if constant else current.shape[1:]
        mems = current.new_empty((t_steps, *shape))
        spikes = current.new_empty((t_steps, *shape))
        total = current.new_zeros(shape if sum_mems else 0)
        integrate = _integrate_numpy if current.device.type == "cpu" else _integrate_torch
        integrate(current.detach(), constant, beta, threshold, subtract, sum_mems, mems, spikes, total)
        ctx.save_for_backward(mems, beta, threshold)
        ctx.constant = constant
        ctx.set_materialize_grads(False)
        return spikes, mems, total

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor | None, grad_mems: torch.Tensor | None,
                 grad_total: torch.Tensor | None):
        mems, beta, threshold = ctx.saved_tensors
        t_steps = mems.shape[0]
        scale = 1.0  # a factor common to every step's direct gradient, moved into the decay matrix
        direct = grad_mems
        if grad_total is not None:  # every step's membrane went into the sum
            direct = grad_total.expand_as(mems) if direct is None else direct + grad_total
        if grad_spikes is not None:  # ATan: dS/dU = alpha / 2 / (1 + (pi / 2 * alpha * (U - threshold)) ** 2)
            shifted = mems - threshold
            through_spikes = torch.div(grad_spikes, torch.addcmul(shifted.new_ones(()), shifted, shifted,
                                                                   value=(math.pi / 2 * ATAN_ALPHA) ** 2))
            if direct is None:
                direct, scale = through_spikes, ATAN_ALPHA / 2
            else:
                direct = direct.add(through_spikes, alpha=ATAN_ALPHA / 2)
        if direct is None:
            return None, None, None, None, None, None
        decay = _decay_matrix(float(beta), t_steps, mems.dtype, mems.device)
        if scale != 1.0:
            decay = decay * scale
        flat = direct.reshape(t_steps, -1)
        if ctx.constant:  # the same current every step: its gradient is the sum over steps
            grad = (decay.sum(dim=0) @ flat).view(mems.shape[1:])
        else:
            grad = (decay @ flat).view(mems.shape)
        return grad, None, None, None, None, None


def spiking_forward(obs: torch.Tensor, linears, betas: list[torch.Tensor], thresholds: list[torch.Tensor],
                    t_steps: int, membrane_readout: bool) -> torch.Tensor:
    """Q-values of snn_ddqn's spiking net: Linear -> Leaky per layer, the observation a constant current.
    Spike readout: summed output spikes; membrane readout: the mean membrane of non-resetting output neurons."""
    batch = obs.shape[0]
    current = linears[0](obs)
    last = len(linears) - 1
    for i, linear in enumerate(linears):
        if i > 0:  # all time steps of this layer's input in one matmul
            current = linear(spikes.reshape(t_steps * batch, -1)).view(t_steps, batch, -1)
        readout = membrane_readout and i == last  # output neurons without reset; their membranes summed
        spikes, mems, total = LeakyLayer.apply(current, betas[i].clamp(0, 1), thresholds[i], t_steps,
                                               not readout, readout)
    return total / t_steps if membrane_readout else spikes.sum(dim=0)
