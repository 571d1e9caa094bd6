r"""A noisy quadratic whose gradient mean, covariance and critical batch are known in closed form.

**Problem** (the noisy quadratic model of Zhang et al. 2019, "Which Algorithmic Choices Matter
at Which Batch Sizes?", with the Hessian-proportional noise they and McCandlish et al. 2018
assume). A diagonal Hessian :math:`H = \mathrm{diag}(h)` with eigenvalues log-spaced from 1 down
to ``1 / condition``, noise covariance :math:`\Sigma = c H` (``c = noise``), and per-example
losses

.. math::
    \ell_i(\theta) = \tfrac12 (\theta - \theta^*)^T H (\theta - \theta^*) + \xi_i^T \theta,
    \qquad \xi_i \sim N(0, \Sigma),

so :math:`E\,\ell_i = L(\theta) = \tfrac12 \delta^T H \delta` with :math:`\delta = \theta -
\theta^*`, and the per-example gradient is exactly :math:`g_i = H\delta + \xi_i`:

.. math::
    G(\theta) = H\delta,\qquad \mathrm{Cov}(g_i) = \Sigma,\qquad
    B_\text{simple}(\theta) = \frac{\mathrm{tr}\,\Sigma}{\|G\|^2},\qquad
    B_\text{noise}(\theta) = \frac{\mathrm{tr}(H\Sigma)}{G^T H G}.

:math:`B_\text{noise}` is McCandlish et al.'s critical batch (the batch at which the best SGD
step gains half of what a noiseless one would), :math:`B_\text{simple}` the estimate of it that
needs no Hessian (equal when :math:`H \propto I`). Both grow as :math:`\theta \to \theta^*`.

**What GradStats reads from a batch of n** (:func:`estimator_variances`). Gradients are
Gaussian, so the unbiased :math:`\widehat{\mathrm{tr}\Sigma}` of ``gradnoise.stats.quantities``
(the sample covariance's trace) is independent of the batch mean :math:`\bar g`, and

.. math::
    \mathrm{Var}\,\widehat{\mathrm{tr}\Sigma} = \frac{2\,\mathrm{tr}\Sigma^2}{n-1},\quad
    \mathrm{Var}\,\widehat{\|G\|^2} = \frac{4 G^T\Sigma G}{n}
        + \frac{2\,\mathrm{tr}\Sigma^2}{n(n-1)},\quad
    \mathrm{Cov} = -\frac{2\,\mathrm{tr}\Sigma^2}{n(n-1)},

with :math:`\widehat{\|G\|^2} = \|\bar g\|^2 - \widehat{\mathrm{tr}\Sigma}/n`. A model is
:class:`QuadraticModel`: its only parameter ``theta`` is broadcast over the batch with
``theta.expand(n, d)``, a use GradStats measures exactly (the ``expand`` rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import require

__all__ = ["NoisyQuadratic", "QuadraticModel", "estimator_variances"]


class QuadraticModel(nn.Module):
    """``forward(noise)``: the ``(n,)`` per-example losses of the module docstring at ``theta``.

    ``noise`` is the ``(n, d)`` batch of :math:`\\xi_i` (:meth:`NoisyQuadratic.sample`).
    """

    def __init__(self, hessian: torch.Tensor, theta_star: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.register_buffer("hessian", hessian.clone())
        self.register_buffer("theta_star", theta_star.clone())
        self.theta = nn.Parameter(theta.clone())

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        theta = self.theta.expand(noise.shape[0], -1)  # example i's copy: its gradient is g_i
        delta = theta - self.theta_star
        return 0.5 * (self.hessian * delta * delta).sum(1) + (noise * theta).sum(1)


@dataclass(frozen=True)
class NoisyQuadratic:
    """The problem of the module docstring: ``dim`` coordinates, ``H = diag(h)`` log-spaced from
    1 to ``1 / condition``, ``Sigma = noise * H``, ``theta* = 0``."""

    dim: int = 64
    condition: float = 100.0
    noise: float = 1.0
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        ok = isinstance(self.dim, int) and not isinstance(self.dim, bool) and self.dim >= 1
        require(ok, "NoisyQuadratic(dim=...)", "an int >= 1", repr(self.dim), "e.g. dim=64")
        ok = self.condition >= 1
        require(ok, "NoisyQuadratic(condition=...)", "a float >= 1", repr(self.condition),
                "use condition=1 for H = I")  # fmt: skip
        ok = self.noise > 0
        require(ok, "NoisyQuadratic(noise=...)", "a positive float", repr(self.noise),
                "e.g. noise=1.0")  # fmt: skip

    @property
    def hessian(self) -> torch.Tensor:
        """The diagonal ``h`` of ``H``: ``condition ** (-j / (dim - 1))``, j = 0..dim-1."""
        top = -math.log10(self.condition)
        return torch.logspace(0.0, top, self.dim, dtype=torch.float64).to(self.dtype)

    @property
    def sigma(self) -> torch.Tensor:
        """The diagonal of ``Sigma = noise * H``."""
        return self.noise * self.hessian

    @property
    def theta_star(self) -> torch.Tensor:
        """The minimizer :math:`\\theta^* = 0`."""
        return torch.zeros(self.dim, dtype=self.dtype)

    def model(self, theta: torch.Tensor) -> QuadraticModel:
        """A :class:`QuadraticModel` at ``theta`` (a ``(dim,)`` tensor, copied)."""
        shape = tuple(theta.shape)
        require(shape == (self.dim,), "NoisyQuadratic.model(theta)", f"shape ({self.dim},)",
                str(shape), "pass one value per coordinate")  # fmt: skip
        return QuadraticModel(self.hessian, self.theta_star, theta.to(self.dtype))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, dim)`` draws of :math:`\\xi \\sim N(0, \\Sigma)`."""
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        return z * self.sigma.sqrt()

    @staticmethod
    def loss(model: nn.Module, noise: torch.Tensor) -> torch.Tensor:
        """The mean over the batch of the per-example losses (``loss_reduction="mean"``)."""
        return model(noise).mean()

    def value(self, theta: torch.Tensor) -> float:
        r""":math:`L(\theta) = \frac12 \delta^T H \delta`, the expected loss."""
        delta = theta.detach().to(self.dtype) - self.theta_star
        return float(0.5 * (self.hessian * delta * delta).sum())

    def gradient(self, theta: torch.Tensor) -> torch.Tensor:
        r""":math:`G(\theta) = H(\theta - \theta^*)`."""
        return self.hessian * (theta.detach().to(self.dtype) - self.theta_star)

    @property
    def trace_sigma(self) -> float:
        r""":math:`\mathrm{tr}\,\Sigma = c \sum_j h_j`."""
        return float(self.sigma.sum())

    def grad_sq_norm(self, theta: torch.Tensor) -> float:
        r""":math:`\|G(\theta)\|^2`."""
        return float(self.gradient(theta).pow(2).sum())

    def b_simple(self, theta: torch.Tensor) -> float:
        r""":math:`B_\text{simple} = \mathrm{tr}\Sigma / \|G\|^2` (inf at :math:`\theta^*`)."""
        grad_sq = self.grad_sq_norm(theta)
        return self.trace_sigma / grad_sq if grad_sq > 0 else math.inf

    def b_noise(self, theta: torch.Tensor) -> float:
        r""":math:`B_\text{noise} = \mathrm{tr}(H\Sigma) / G^T H G` (inf at :math:`\theta^*`)."""
        grad = self.gradient(theta)
        curvature = float((self.hessian * grad * grad).sum())
        trace = float((self.hessian * self.sigma).sum())
        return trace / curvature if curvature > 0 else math.inf


def estimator_variances(
    problem: NoisyQuadratic, theta: torch.Tensor, n: int
) -> tuple[float, float, float]:
    r"""``(Var tr, Var |G|^2, Cov)`` of the unbiased one-batch estimates from ``n`` examples at
    ``theta`` (the module docstring's formulas; exact, since the gradients are Gaussian)."""
    require(n >= 2, "estimator_variances(n=...)", "an int >= 2", repr(n),
            "a variance needs two examples")  # fmt: skip
    trace_sq = float(problem.sigma.pow(2).sum())
    grad = problem.gradient(theta)
    signal = float((grad * problem.sigma * grad).sum())
    var_trace = 2 * trace_sq / (n - 1)
    cross = 2 * trace_sq / (n * (n - 1))
    return var_trace, 4 * signal / n + cross, -cross
