r"""Zeroth-order and forward-only estimators: SPSA, forward gradients and MeZO.

SPSA and the forward gradient estimate the gradient of the Gaussian-smoothed objective
:math:`f_\sigma(\theta) = E_{\epsilon \sim N(0, I)}[f(\theta + \sigma\epsilon)]`, so they take
``dist = Normal(theta, sigma)`` (optionally ``Independent``) and differentiate w.r.t. its ``loc``:

.. math::
    \text{SPSA (Spall 1992; two-point, antithetic):}\quad
    t_k = \frac{f(\theta + \sigma\epsilon_k) - f(\theta - \sigma\epsilon_k)}{2\sigma}\,\epsilon_k,

.. math::
    \text{forward gradient (Baydin et al. 2022):}\quad
    t_k = (\nabla f(x_k) \cdot v_k)\, v_k,\quad x_k = \theta + \sigma\epsilon_k,\ v_k \sim N(0, I),

with :math:`\nabla f(x_k)\cdot v_k` from one ``torch.func.jvp`` (no backward pass). For a quadratic
``f`` both are unbiased for :math:`\nabla f(\theta)` and :math:`\mathrm{Var}[t]_j = \|g\|^2 +
g_j^2` (SPSA exactly; the forward gradient up to :math:`O(\sigma^2)`).

:class:`MeZO` is SPSA on an ``nn.Module``'s parameters with in-place, seed-regenerated directions
(:mod:`gradnoise.perturbation`); its moments are accumulated direction by direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributions import Independent, Normal
from torch.func import jvp

from gradnoise.errors import GradNoiseError, explain
from gradnoise.estimators.core import (
    DistLike,
    Estimate,
    SampleFn,
    check_num_samples,
    draw,
    evaluate,
    finish,
    require_grad_path,
)
from gradnoise.perturbation import directions, magnitude_masks, projected_gradient
from gradnoise.stats.moments import GradMoments

__all__ = ["SPSA", "ForwardGradient", "MeZO"]


def _smoothing(dist: DistLike, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of a Gaussian smoothing distribution whose loc requires grad."""
    dist = (
        dist()
        if callable(dist) and not isinstance(dist, torch.distributions.Distribution)
        else dist
    )
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if not isinstance(base, Normal) or not base.loc.requires_grad:
        raise GradNoiseError(
            explain(
                what,
                expected="Normal(theta, sigma) (or Independent of it) with theta.requires_grad",
                got=f"{type(base).__name__}"
                + ("" if not isinstance(base, Normal) else " whose loc does not require grad"),
                fix="smooth the objective with Normal(theta, sigma), theta.requires_grad_()",
            )
        )
    return base.loc, base.scale.detach()


class SPSA:
    """Two-point antithetic SPSA over ``num_samples`` Gaussian directions (2 evaluations each)."""

    name = "spsa"

    def __call__(
        self,
        f: SampleFn,
        dist: DistLike,
        num_samples: int = 16,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate:
        loc, scale = _smoothing(dist, "SPSA")
        check_num_samples("SPSA", num_samples)
        theta = loc.detach()
        eps = draw("normal", (num_samples, *theta.shape), theta, generator)
        with torch.no_grad():
            plus = evaluate("SPSA", f, theta + scale * eps, num_samples)
            minus = evaluate("SPSA", f, theta - scale * eps, num_samples)
        slope = (plus - minus) / 2
        term = slope.reshape(-1, *([1] * theta.dim())) * eps / scale
        return finish((loc,), [term], block=1, num_evals=2 * num_samples)


class ForwardGradient:
    """Forward-mode gradients: one ``jvp`` along a random direction per sample."""

    name = "forward_gradient"

    def __call__(
        self,
        f: SampleFn,
        dist: DistLike,
        num_samples: int = 16,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate:
        loc, scale = _smoothing(dist, "ForwardGradient")
        check_num_samples("ForwardGradient", num_samples)
        theta = loc.detach()
        shape = (num_samples, *theta.shape)
        eps = draw("normal", shape, theta, generator)
        v = draw("normal", shape, theta, generator)
        x = theta + scale * eps
        # Shape and differentiability checks before the jvp, which would silently return a zero
        # slope for an f with no gradient path (detach, comparisons, argmax).
        with torch.enable_grad():
            values = evaluate("ForwardGradient", f, x.detach().requires_grad_(), num_samples)
        require_grad_path("ForwardGradient", values, alternative="SPSA")
        _, slope = jvp(f, (x,), (v,))
        term = slope.detach().reshape(-1, *([1] * theta.dim())) * v
        return finish((loc,), [term], block=1, num_evals=num_samples)


class MeZO:
    """MeZO gradient estimate of ``loss()`` w.r.t. ``params``, with its moments.

    Unlike the optimizer (:class:`gradnoise.optim.MeZO`), this materializes the mean gradient and
    its elementwise second moment (two parameter-sized buffers), to report the variance.
    ``density < 1`` gives Sparse-MeZO.
    """

    name = "mezo"

    def __init__(self, eps: float = 1e-3, *, density: float = 1.0) -> None:
        self.eps, self.density = eps, density

    def __call__(
        self,
        loss: Callable[[], torch.Tensor],
        params: Sequence[torch.Tensor],
        num_samples: int = 16,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate:
        params = _trainable(params)
        check_num_samples("MeZO", num_samples)
        masks = None if self.density == 1.0 else magnitude_masks(params, self.density)
        sums = [[torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())] for p in params]
        for _ in range(num_samples):
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            slope, _, _ = projected_gradient(loss, params, seed, self.eps, masks)
            for acc, (_, z) in zip(sums, directions(params, seed, masks), strict=True):
                acc[0].add_(z, alpha=slope)
                acc[1].addcmul_(z, z, value=slope**2)
                acc[2] += slope**2 * z.pow(2).sum()
        moments = tuple(GradMoments(num_samples, g, s, e) for g, e, s in sums)
        grads = tuple(m.mean for m in moments)
        return Estimate(tuple(params), grads, moments, num_samples, 2 * num_samples)


def _trainable(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # A lone tensor would be iterated row by row: every row perturbed and reported as a separate
    # 0-dim "parameter" (views, not the tensor); torch.optim refuses it the same way.
    given = type(params).__name__
    try:
        params = None if isinstance(params, torch.Tensor) else list(params)
    except TypeError:  # not iterable, e.g. the module itself instead of model.parameters()
        params = None
    if params is None or not all(isinstance(p, torch.Tensor) for p in params):
        raise GradNoiseError(
            explain(
                "MeZO params",
                expected="an iterable of tensors (e.g. model.parameters() or [theta])",
                got=f"a single {given}" if params is None else "an iterable holding non-tensors",
                fix="pass tensors only, e.g. model.parameters(); wrap a single tensor in a list, "
                "MeZO()(loss, [theta])",
            )
        )
    params = [p for p in params if p.requires_grad]
    if not params:
        raise GradNoiseError(
            explain(
                "MeZO params",
                expected="at least one tensor with requires_grad=True",
                got="no trainable tensor",
                fix="pass model.parameters() with the parameters to tune unfrozen",
            )
        )
    return params
