"""One trained rate network as the analysis sees it: the trainer's one-step map and its derivatives.

Column convention, as learning_rules.py and the seed: h' = F(h) = (1 - dt) h + dt (J_in u + J_rec phi(h) + b),
so F(h) - h = dt v(h) with v the continuous-time velocity (the seed's `GetF` returns exactly dt v).
phi = tanh (`dynamics: tanh`, and full-FORCE) or 1 + tanh (`dynamics: seed`); phi' = 1 - tanh^2 for both.
States are rows here ([..., H]), so J_rec phi(h) is phi(h) @ J_rec^T. float64 throughout: fixed points are
polished to |v| ~ 1e-12, and a 50-unit network costs nothing either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

MATRICES = ("J_in", "J_rec", "J_out", "b")
DYNAMICS = ("tanh", "seed")


class BadNetwork(ValueError):
    """Saved matrices that do not make one network (a missing matrix, shapes that disagree)."""


@dataclass(frozen=True)
class Network:
    J_in: Tensor  # [H, I]
    J_rec: Tensor  # [H, H]
    J_out: Tensor  # [1, H]
    b: Tensor  # [H]
    dt: float
    dynamics: str = "tanh"

    @classmethod
    def from_matrices(cls, matrices: Mapping[str, Any], dt: float | None = None, dynamics: str | None = None,
                      dtype: torch.dtype = torch.float64) -> "Network":
        """From learning_rules' matrices.npz (as `load_matrices` reads it) or a checkpoint's `params`."""
        missing = [k for k in MATRICES if k not in matrices]
        if missing:
            raise BadNetwork(f"matrices lack {', '.join(missing)} (need {', '.join(MATRICES)})")
        values = {k: torch.as_tensor(np.asarray(matrices[k]), dtype=dtype) for k in MATRICES}
        dt = float(matrices["dt"] if dt is None else dt)
        dynamics = str(matrices.get("dynamics", "tanh") if dynamics is None else dynamics)
        if dynamics not in DYNAMICS:
            raise BadNetwork(f"dynamics '{dynamics}' is not one of {', '.join(DYNAMICS)}")
        H = values["J_rec"].shape[0]
        expected = {"J_rec": (H, H), "J_out": (1, H), "b": (H,)}
        for key, shape in expected.items():
            if tuple(values[key].shape) != shape:
                raise BadNetwork(f"{key} has shape {tuple(values[key].shape)}, expected {shape} for {H} units")
        if values["J_in"].dim() != 2 or values["J_in"].shape[0] != H:
            raise BadNetwork(f"J_in has shape {tuple(values['J_in'].shape)}, expected ({H}, inputs)")
        return cls(values["J_in"], values["J_rec"], values["J_out"], values["b"], dt, dynamics)

    @property
    def units(self) -> int:
        return self.J_rec.shape[0]

    @property
    def inputs(self) -> int:
        return self.J_in.shape[1]

    def phi(self, h: Tensor) -> Tensor:
        return torch.tanh(h) + 1.0 if self.dynamics == "seed" else torch.tanh(h)

    def velocity(self, h: Tensor, u: Tensor) -> Tensor:
        """dh/dt = -h + J_in u + J_rec phi(h) + b for states [..., H] and inputs broadcastable to [..., I]."""
        return -h + u @ self.J_in.T + self.phi(h) @ self.J_rec.T + self.b

    def step(self, h: Tensor, u: Tensor) -> Tensor:
        """The trainer's one-step map F(h) = h + dt v(h)."""
        return h + self.dt * self.velocity(h, u)

    def output(self, h: Tensor) -> Tensor:
        """y = tanh(J_out tanh h) (tanh dynamics) or J_out h (the seed's), one value per state."""
        if self.dynamics == "seed":
            return (h @ self.J_out.T)[..., 0]
        return torch.tanh(torch.tanh(h) @ self.J_out.T)[..., 0]

    def velocity_jacobian(self, h: Tensor) -> Tensor:
        """dv/dh = -I + J_rec diag(phi'(h)), closed form, for states [..., H] -> [..., H, H]."""
        slope = 1.0 - torch.tanh(h) ** 2
        eye = torch.eye(self.units, dtype=h.dtype, device=h.device)
        return self.J_rec * slope.unsqueeze(-2) - eye

    def map_jacobian(self, h: Tensor) -> Tensor:
        """dF/dh = I + dt dv/dh: the Jacobian whose eigenvalues decide stability of the map the network runs."""
        eye = torch.eye(self.units, dtype=h.dtype, device=h.device)
        return eye + self.dt * self.velocity_jacobian(h)

    def trajectories(self, inputs: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """Run trials: inputs [T, B, I], h0 [B, H] -> states [T, B, H] (after each step, as the trainer keeps
        them) and outputs [T, B]."""
        h, states = h0.to(self.J_rec.dtype), []
        inputs = inputs.to(self.J_rec.dtype)
        for u in inputs:
            h = self.step(h, u)
            states.append(h)
        states_t = torch.stack(states)
        return states_t, self.output(states_t)
