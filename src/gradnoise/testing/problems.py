r"""Closed-form problems: gradients whose mean and covariance are known exactly.

**Linear-Gaussian regression.** Inputs :math:`x \sim N(0, I_d)`, targets
:math:`y = x^T w^* + \epsilon` with :math:`\epsilon \sim N(0, \sigma^2)`, per-example loss
:math:`\tfrac12 (x^T w - y)^2`. With :math:`\delta = w - w^*` the per-example gradient is
:math:`g = x (x^T \delta - \epsilon)`, and by Isserlis' theorem

.. math::
    G = \delta,\qquad \Sigma = \delta\delta^T + (\|\delta\|^2 + \sigma^2) I,\qquad
    \mathrm{tr}\Sigma = (1 + d)\|\delta\|^2 + d\sigma^2,\qquad
    B_\text{simple} = 1 + d + d\sigma^2 / \|\delta\|^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LinearGaussian"]


@dataclass(frozen=True)
class LinearGaussian:
    """Linear-Gaussian regression at a fixed parameter ``w = w_star + delta``."""

    dim: int = 8
    sigma: float = 1.0
    delta_norm: float = 1.0
    dtype: torch.dtype = torch.float64

    @property
    def delta(self) -> torch.Tensor:
        return torch.full((self.dim,), self.delta_norm / self.dim**0.5, dtype=self.dtype)

    @property
    def w_star(self) -> torch.Tensor:
        return torch.linspace(-1.0, 1.0, self.dim, dtype=self.dtype)

    def model(self) -> nn.Linear:
        """A bias-free ``nn.Linear(dim, 1)`` whose weight is ``w_star + delta``."""
        layer = nn.Linear(self.dim, 1, bias=False).to(self.dtype)
        with torch.no_grad():
            layer.weight.copy_((self.w_star + self.delta).unsqueeze(0))
        return layer

    def sample(
        self, n: int, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` pairs ``(x, y)`` with ``x: (n, dim)`` and ``y: (n, 1)``."""
        x = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        noise = self.sigma * torch.randn(n, 1, generator=generator, dtype=self.dtype)
        return x, x @ self.w_star.unsqueeze(1) + noise

    @staticmethod
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``0.5 * (model(x) - y)^2``."""
        return 0.5 * (model(x) - y).pow(2).squeeze(1).mean()

    @property
    def true_grad(self) -> torch.Tensor:
        return self.delta

    @property
    def true_covariance(self) -> torch.Tensor:
        d = self.delta
        eye = torch.eye(self.dim, dtype=self.dtype)
        return torch.outer(d, d) + (d.dot(d) + self.sigma**2) * eye

    @property
    def true_trace_sigma(self) -> float:
        return (1 + self.dim) * self.delta_norm**2 + self.dim * self.sigma**2

    @property
    def true_b_simple(self) -> float:
        return 1 + self.dim + self.dim * self.sigma**2 / self.delta_norm**2
