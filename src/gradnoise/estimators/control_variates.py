r"""Control variates with a closed-form expectation and an online coefficient.

A control variate is a function :math:`h: x \mapsto \mathbb{R}^m` whose expectation
:math:`\bar h(\theta) = E_{p_\theta}[h(x)]` is known in closed form (Mohamed et al. 2020,
section 7.4; Paisley et al. 2012). The estimator computes the per-sample gradient terms
:math:`c_k` of each :math:`h_i` with *the same* estimator it uses for ``f``; since
:math:`E[c_k] = \nabla_\theta \bar h` exactly, the corrected term

.. math::
    t'_{kj} = t_{kj} - \beta_j^\top (c_{kj} - \nabla_{\theta_j} \bar h),\qquad
    \beta_j = (\mathrm{E}[\tilde c_j \tilde c_j^\top] + \lambda I)^{-1}\,
              \mathrm{E}[\tilde c_j\, t_j]\ \in \mathbb{R}^m

is unbiased for any :math:`\beta` independent of the current samples, and has the least variance
per coordinate :math:`j` at the :math:`\beta_j` above. With :math:`m > 1` controls the coefficients
of all coordinates form a ``(*shape, m)`` matrix (a vector-valued control variate with a matrix
coefficient, Geffner & Domke 2018). The moments in :math:`\beta_j` are exponential moving averages
over *previous* calls, so the first call is uncorrected and no call is biased.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributions import Distribution

from gradnoise.errors import GradNoiseError, explain

__all__ = ["ControlVariate"]


class ControlVariate:
    """``h(samples) -> (K,) or (K, m)`` with ``expectation(dist) -> () or (m,)`` in closed form."""

    def __init__(
        self,
        h: Callable[[torch.Tensor], torch.Tensor],
        expectation: Callable[[Distribution], torch.Tensor],
        *,
        decay: float = 0.5,
        ridge: float = 1e-8,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise GradNoiseError(
                explain(
                    "ControlVariate decay",
                    expected="a float in [0, 1)",
                    got=repr(decay),
                    fix="use e.g. decay=0.5 (larger averages the coefficient over more calls)",
                )
            )
        self.h, self.expectation, self.decay, self.ridge = h, expectation, decay, ridge
        self.state: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def values(self, samples: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``h`` at the samples as ``(K, m)``; raises if ``h`` returns another shape."""
        out = self.h(samples)
        out = out.unsqueeze(1) if out.dim() == 1 else out
        if out.dim() != 2 or out.shape[0] != num_samples:
            raise GradNoiseError(
                explain(
                    "ControlVariate h",
                    expected=f"a tensor of shape ({num_samples},) or ({num_samples}, m)",
                    got=str(tuple(out.shape)),
                    fix="return one value (or one row of m values) per sample",
                )
            )
        return out

    def mean_grads(self, dist: Distribution, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        r""":math:`\nabla_\theta \bar h_i` for every control ``i``, as ``(*shape, m)``."""
        mean = self.expectation(dist).reshape(-1)
        rows = [
            torch.autograd.grad(mean[i], list(params), retain_graph=True, allow_unused=True)
            for i in range(mean.shape[0])
        ]
        return [
            torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows], -1)
            for j, p in enumerate(params)
        ]

    def correct(
        self, terms: list[torch.Tensor], controls: list[torch.Tensor], means: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Subtract ``beta * (c - Ec)`` from terms ``(K, *shape)``; controls: ``(K, *shape, m)``."""
        centred = [c - m for c, m in zip(controls, means, strict=True)]
        betas = self._coefficients(terms)
        corrected = [
            t - (c * b).sum(-1) if b is not None else t
            for t, c, b in zip(terms, centred, betas, strict=True)
        ]
        self._update(terms, centred)
        return corrected

    def _coefficients(self, terms: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.state is None:
            return [None] * len(terms)
        betas = []
        for cc, ct in self.state:
            eye = torch.eye(cc.shape[-1], dtype=cc.dtype)
            betas.append(torch.linalg.solve(cc + self.ridge * eye, ct.unsqueeze(-1)).squeeze(-1))
        return betas

    def _update(self, terms: list[torch.Tensor], centred: list[torch.Tensor]) -> None:
        batch = [
            ((c.unsqueeze(-1) * c.unsqueeze(-2)).mean(0), (c * t.unsqueeze(-1)).mean(0))
            for t, c in zip(terms, centred, strict=True)
        ]
        if self.state is None:
            self.state = batch
            return
        d = self.decay
        self.state = [
            (d * cc + (1 - d) * bcc, d * ct + (1 - d) * bct)
            for (cc, ct), (bcc, bct) in zip(self.state, batch, strict=True)
        ]
