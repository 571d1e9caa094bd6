r"""Samplers: where the ``K`` samples of an estimator come from.

A sampler has ``block`` (how many consecutive samples form one independent term) and
``sample(dist, num_samples, *, generator, reparam) -> Tensor`` of shape ``(K, *dist shape)``.

* :class:`IID` draws independent samples (``block = 1``).
* :class:`Antithetic` pairs :math:`u` with :math:`1 - u` through the inverse CDF,
  :math:`x^\pm = F^{-1}(u), F^{-1}(1-u)` (for a Gaussian, :math:`\mu \pm \sigma\epsilon`); a pair is
  one term (``block = 2``). Mohamed et al. 2020, section 8.2.
* :class:`QMC` uses randomized (scrambled) Sobol points through the inverse CDF; ``points``
  consecutive samples share one scramble and form one term, so independent scrambles give an
  honest variance (Owen 1997; Mohamed et al. 2020, section 8.3).

The inverse-CDF samplers need a distribution with ``icdf`` (Normal, Laplace, Cauchy, Exponential,
Uniform, ...), optionally wrapped in ``Independent``.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent
from torch.quasirandom import SobolEngine

from gradnoise.errors import GradNoiseError, explain
from gradnoise.estimators.core import draw, seeded

__all__ = ["IID", "QMC", "Antithetic", "Sampler"]

_EDGE = 1e-7  # keep u inside (0, 1) so that icdf stays finite


class Sampler:
    """Protocol: ``block`` and ``sample(dist, num_samples, *, generator, reparam)``."""

    block: int = 1

    def sample(
        self,
        dist: Distribution,
        num_samples: int,
        *,
        generator: torch.Generator | None,
        reparam: bool,
    ) -> torch.Tensor:
        raise NotImplementedError


class IID(Sampler):
    """Independent draws with ``dist.rsample`` (reparam) or ``dist.sample``."""

    block = 1

    def sample(self, dist, num_samples, *, generator, reparam):
        with seeded(generator):
            return dist.rsample((num_samples,)) if reparam else dist.sample((num_samples,))


def _univariate(dist: Distribution) -> Distribution:
    base = dist
    while isinstance(base, Independent):
        base = base.base_dist
    if type(base).icdf is Distribution.icdf:
        raise GradNoiseError(
            explain(
                "inverse-CDF sampler",
                expected="a distribution with icdf (Normal, Laplace, Cauchy, Exponential, ...)",
                got=f"{type(base).__name__}, which has no icdf",
                fix="use the IID sampler for this distribution",
            )
        )
    return base


def _through_icdf(dist: Distribution, u: torch.Tensor, reparam: bool) -> torch.Tensor:
    x = _univariate(dist).icdf(u.clamp(_EDGE, 1 - _EDGE))
    return x if reparam else x.detach()


class Antithetic(Sampler):
    """Antithetic pairs :math:`(F^{-1}(u), F^{-1}(1-u))`; each pair is one term."""

    block = 2

    def sample(self, dist, num_samples, *, generator, reparam):
        base = _univariate(dist)
        u = draw("uniform", (num_samples // 2, *base.batch_shape), base.mean, generator)
        return _through_icdf(dist, torch.stack([u, 1 - u], 1).flatten(0, 1), reparam)


class QMC(Sampler):
    """Scrambled Sobol points; ``points`` per independent scramble form one term."""

    def __init__(self, points: int = 16) -> None:
        if not isinstance(points, int) or points < 2:
            raise GradNoiseError(
                explain(
                    "QMC points",
                    expected="an int >= 2 (points per scramble; powers of 2 work best)",
                    got=repr(points),
                    fix="use e.g. QMC(points=16)",
                )
            )
        self.block = points

    def sample(self, dist, num_samples, *, generator, reparam):
        base = _univariate(dist)
        shape, dtype = base.batch_shape, base.mean.dtype
        dim = max(1, shape.numel())
        blocks = []
        for _ in range(num_samples // self.block):
            seed = int(torch.randint(0, 2**31, (), generator=generator))
            engine = SobolEngine(dim, scramble=True, seed=seed)
            blocks.append(engine.draw(self.block, dtype=dtype).reshape(self.block, *shape))
        return _through_icdf(dist, torch.cat(blocks).to(base.mean.device), reparam)
