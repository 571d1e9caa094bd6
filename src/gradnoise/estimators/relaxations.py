r"""Continuous relaxations of discrete samples: Gumbel-softmax and straight-through.

For a categorical with logits :math:`\ell` and Gumbel noise :math:`g_c = -\log(-\log u_c)`,
Jang et al. 2017 and Maddison et al. 2017 (the Concrete distribution) relax the one-hot sample to

.. math::
    y = \mathrm{softmax}((\ell + g) / \tau),\qquad t_k = \nabla_\theta f(y_k),

and the straight-through variant (Bengio et al. 2013; Jang et al. 2017) feeds the hard one-hot
:math:`h = \mathrm{onehot}(\arg\max y)` forward while back-propagating through :math:`y`
(:math:`h + y - \mathrm{sg}(y)`). For a Bernoulli the relaxation is
:math:`y = \sigma((\ell + \log u - \log(1-u)) / \tau)`.

Both are **biased** for discrete ``f`` (the bias vanishes as :math:`\tau \to 0` while the
variance grows); their reported variance is exact like every other estimator's. ``f`` receives
one-hot vectors ``(K, *batch, C)`` for categoricals and ``{0, 1}``-valued floats for Bernoullis
(use ``OneHotCategorical`` so one ``f`` serves the score-function estimator too).
"""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from gradnoise.errors import GradNoiseError, explain
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

__all__ = ["GumbelSoftmax", "StraightThrough", "relaxed_sample"]


def _check_temperature(temperature: float, what: str) -> float:
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise GradNoiseError(
            explain(
                f"{what} temperature",
                expected="a positive float",
                got=repr(temperature),
                fix="use e.g. temperature=0.5 (lower: less bias, more variance)",
            )
        )
    return float(temperature)


def relaxed_sample(
    dist, num_samples: int, temperature: float, *, hard: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """``K`` relaxed (``hard=False``) or straight-through (``hard=True``) samples."""
    if not isinstance(dist, (Bernoulli, Categorical, OneHotCategorical)):
        raise GradNoiseError(
            explain(
                "relaxation",
                expected="a Categorical, OneHotCategorical or Bernoulli distribution",
                got=type(dist).__name__,
                fix="use Pathwise for continuous distributions, ScoreFunction for other discrete",
            )
        )
    logits = dist.logits
    u = torch.rand((num_samples, *logits.shape), generator=generator, dtype=logits.dtype)
    u = u.clamp(1e-10, 1 - 1e-10)
    if isinstance(dist, Bernoulli):
        soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)
        hard_sample = (soft > 0.5).to(soft.dtype)
    else:
        soft = torch.softmax((logits - (-u.log()).log()) / temperature, -1)
        hard_sample = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard_sample + (soft - soft.detach()) if hard else soft  # forward value: exactly hard


class _Relaxation:
    hard = False
    name = "relaxation"

    def __init__(self, temperature: float = 0.5) -> None:
        self.temperature = _check_temperature(temperature, type(self).__name__)

    def __call__(
        self,
        f: SampleFn,
        dist: DistLike,
        num_samples: int = 16,
        *,
        generator: torch.Generator | None = None,
    ) -> Estimate:
        what = type(self).__name__
        dist, params = resolve(dist, what)
        check_num_samples(what, num_samples)
        chunks = []
        for size in chunk_sizes(num_samples, 1):
            y = relaxed_sample(dist, size, self.temperature, hard=self.hard, generator=generator)
            values = require_grad_path(what, evaluate(what, f, y, size), sample="relaxed sample")
            chunks.append(per_sample_grads(values, params))
        terms = [torch.cat(t) for t in zip(*chunks, strict=True)]
        return finish(params, terms, block=1, num_evals=num_samples)


class GumbelSoftmax(_Relaxation):
    """Concrete / Gumbel-softmax pathwise gradients at ``temperature``."""

    name = "gumbel_softmax"


class StraightThrough(_Relaxation):
    """Straight-through Gumbel: hard one-hot forward, relaxed gradient backward."""

    hard = True
    name = "straight_through"
