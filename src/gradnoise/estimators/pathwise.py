r"""The pathwise (reparameterization) estimator.

Kingma & Welling 2014; Rezende et al. 2014; Mohamed et al. 2020, section 5. With
:math:`x = g(\epsilon; \theta)`, :math:`\epsilon \sim p(\epsilon)` (``dist.rsample``),

.. math::
    \nabla_\theta E_{p_\theta}[f(x)] = E_{p(\epsilon)}[\nabla_x f(x)\, \nabla_\theta g(\epsilon;
    \theta)],\qquad t_k = \nabla_\theta f(g(\epsilon_k; \theta)).

``f`` must be differentiable and ``dist`` must implement ``rsample``.
"""

from __future__ import annotations

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.estimators.control_variates import ControlVariate
from gradnoise.estimators.core import (
    DistLike,
    Estimate,
    SampleFn,
    check_num_samples,
    evaluate,
    finish,
    per_sample_grads,
    resolve,
)
from gradnoise.estimators.sampling import IID, Sampler

__all__ = ["Pathwise", "require_rsample"]


def require_rsample(dist, what: str) -> None:
    """Raise unless ``dist`` can draw reparameterized samples."""
    if not dist.has_rsample:
        raise GradNoiseError(
            explain(
                what,
                expected="a distribution with rsample (has_rsample=True)",
                got=f"{type(dist).__name__}, which has no rsample",
                fix="use ScoreFunction for it, or a relaxation (GumbelSoftmax) for discrete ones",
            )
        )


class Pathwise:
    """Reparameterization gradients, with an optional control variate and sampler."""

    name = "pathwise"

    def __init__(
        self, *, control_variate: ControlVariate | None = None, sampler: Sampler | None = None
    ) -> None:
        self.control_variate = control_variate
        self.sampler = IID() if sampler is None else sampler

    def __call__(
        self,
        f: SampleFn,
        dist: DistLike,
        num_samples: int = 16,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate:
        dist, params = resolve(dist, "Pathwise")
        require_rsample(dist, "Pathwise")
        check_num_samples("Pathwise", num_samples, self.sampler.block)
        x = self.sampler.sample(dist, num_samples, generator=generator, reparam=True)
        values = evaluate("Pathwise", f, x, num_samples)
        cv = self.control_variate
        terms = per_sample_grads(values, params, retain_graph=cv is not None)
        if cv is not None:
            h = cv.values(x, num_samples)
            columns = [
                per_sample_grads(h[:, i], params, retain_graph=True) for i in range(h.shape[1])
            ]
            controls = [torch.stack(per_param, -1) for per_param in zip(*columns, strict=True)]
            terms = cv.correct(terms, controls, cv.mean_grads(dist, params))
        return finish(params, terms, block=self.sampler.block, num_evals=num_samples)
