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
    chunk_sizes,
    evaluate,
    finish,
    per_sample_grads,
    require_grad_path,
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
        chunks = [
            self._chunk(f, dist, params, size, generator)
            for size in chunk_sizes(num_samples, self.sampler.block)
        ]
        terms = [torch.cat(t) for t in zip(*(c[0] for c in chunks), strict=True)]
        if self.control_variate is not None:
            controls = [torch.cat(c) for c in zip(*(c[1] for c in chunks), strict=True)]
            means = self.control_variate.mean_grads(dist, params, controls[0].shape[-1])
            terms = self.control_variate.correct(terms, controls, means)
        return finish(params, terms, block=self.sampler.block, num_evals=num_samples)

    def _chunk(self, f, dist, params, size, generator):
        """Per-sample gradients of ``f`` (and of the control variate's ``h``) for one chunk."""
        x = self.sampler.sample(dist, size, generator=generator, reparam=True)
        values = require_grad_path("Pathwise", evaluate("Pathwise", f, x, size))
        terms = per_sample_grads(values, params)
        if self.control_variate is None:
            return terms, None
        h = self.control_variate.values(x, size, differentiable=True)
        columns = [per_sample_grads(h[:, i], params) for i in range(h.shape[1])]
        return terms, [torch.stack(per_param, -1) for per_param in zip(*columns, strict=True)]
