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

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch.distributions import Distribution

from gradnoise.errors import GradNoiseError, explain

__all__ = ["ControlVariate"]


class ControlVariate:
    """``h(samples) -> (K,) or (K, m)`` with ``expectation(dist) -> () or (m,)`` in closed form.

    ``expectation`` may also return a Python number, a constant or a detached tensor: its gradient
    is then zero (right for a control whose expectation does not depend on the parameters).
    """

    def __init__(
        self,
        h: Callable[[torch.Tensor], torch.Tensor],
        expectation: Callable[[Distribution], torch.Tensor | float],
        *,
        decay: float = 0.5,
        ridge: float = 1e-8,
    ) -> None:
        if not _is_real(decay) or not 0.0 <= decay < 1.0:
            raise GradNoiseError(
                explain(
                    "ControlVariate decay",
                    expected="a float in [0, 1)",
                    got=repr(decay),
                    fix="use e.g. decay=0.5 (larger averages the coefficient over more calls)",
                )
            )
        if not _is_real(ridge) or not 0.0 <= ridge < math.inf:
            raise GradNoiseError(
                explain(
                    "ControlVariate ridge",
                    expected="a finite float >= 0",
                    got=repr(ridge),
                    fix="use e.g. ridge=1e-8 (it regularizes the coefficients' linear solve)",
                )
            )
        self.h, self.expectation, self.decay, self.ridge = h, expectation, decay, ridge
        self.state: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def values(
        self, samples: torch.Tensor, num_samples: int, *, differentiable: bool = False
    ) -> torch.Tensor:
        """``h`` at the samples as ``(K, m)``; raises if ``h`` returns another shape.

        ``differentiable=True`` (the pathwise estimator) also insists that the values depend on
        the samples through autograd: the pathwise terms of a control with no gradient path
        would be zero while its closed-form gradient is not, which biases the correction.
        """
        out = self.h(samples)
        if not isinstance(out, torch.Tensor):
            raise GradNoiseError(
                explain(
                    "ControlVariate h",
                    expected=f"a tensor of shape ({num_samples},) or ({num_samples}, m)",
                    got=type(out).__name__,
                    fix="return a torch tensor computed from the samples, e.g. lambda x: x",
                )
            )
        out = out.unsqueeze(1) if out.dim() == 1 else out
        if out.dim() != 2 or out.shape[0] != num_samples or out.shape[1] == 0:
            raise GradNoiseError(
                explain(
                    "ControlVariate h",
                    expected=f"a tensor of shape ({num_samples},) or ({num_samples}, m), m >= 1",
                    got=str(tuple(out.shape)),
                    fix="return one value (or one row of m values) per sample",
                )
            )
        if differentiable and not out.requires_grad:
            raise GradNoiseError(
                explain(
                    "ControlVariate h (pathwise)",
                    expected="values differentiable in the samples (built from torch ops on x)",
                    got="a tensor with no gradient path to the samples",
                    fix="make h a differentiable function of x (no detach, numpy, comparisons "
                    "or argmax), or use the control variate with ScoreFunction",
                )
            )
        return out

    def mean_grads(
        self, dist: Distribution, params: Sequence[torch.Tensor], m: int | None = None
    ) -> list[torch.Tensor]:
        r""":math:`\nabla_\theta \bar h_i` for every control ``i``, as ``(*shape, m)``.

        ``m`` is the number of controls ``h`` returned; the expectation must match it (shape
        ``(m,)``, or ``()`` / a number when ``m == 1``), and so must the coefficients' state from
        earlier calls. Everything is checked here, before the estimator changes any state. A
        constant expectation (a number, or a tensor with no gradient path) has zero gradient.
        """
        mean = self.expectation(dist)
        if isinstance(mean, numbers.Real) and not isinstance(mean, bool):
            mean = torch.tensor(float(mean))
        if not isinstance(mean, torch.Tensor):
            raise GradNoiseError(
                explain(
                    "ControlVariate expectation",
                    expected="E[h] as a tensor of shape () or (m,), or a Python number",
                    got=type(mean).__name__,
                    fix="return the closed form computed from the distribution, e.g. d.mean",
                )
            )
        m = mean.numel() if m is None else m
        shapes = [(m,)] if m > 1 else [(), (1,)]
        if tuple(mean.shape) not in shapes:
            expected = (
                f"a tensor of shape ({m},) matching h's {m} controls"
                if m > 1
                else "a tensor of shape () or (1,) (or a number) matching h's one control"
            )
            fix = (
                "return one expectation per column of h(samples) (a scalar is not broadcast)"
                if m > 1 and mean.dim() == 0
                else "return E[h] with one entry per column of h(samples), e.g. d.mean for h(x) = x"
            )
            raise GradNoiseError(
                explain(
                    "ControlVariate expectation",
                    expected=expected,
                    got=f"shape {tuple(mean.shape)}",
                    fix=fix,
                )
            )
        self._check_state(params, m)
        mean = mean.reshape(-1)
        if not mean.requires_grad:  # a constant: its gradient is zero
            return [torch.zeros((*p.shape, m), dtype=p.dtype, device=p.device) for p in params]
        rows = [
            torch.autograd.grad(mean[i], list(params), retain_graph=True, allow_unused=True)
            for i in range(m)
        ]
        return [
            torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows], -1)
            for j, p in enumerate(params)
        ]

    def _check_state(self, params: Sequence[torch.Tensor], m: int) -> None:
        """The coefficients of earlier calls must fit these parameters and ``m`` controls."""
        if self.state is None:
            return
        want = [(*p.shape, m) for p in params]
        have = [tuple(ct.shape) for _, ct in self.state]
        if have != want:
            raise GradNoiseError(
                explain(
                    "ControlVariate",
                    expected=f"the parameter shapes x controls of its earlier calls, {have}",
                    got=f"{want}",
                    fix="use one ControlVariate per problem (its coefficients are fitted to "
                    "one set of parameters and controls), or set cv.state = None to restart",
                )
            )

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
            eye = torch.eye(cc.shape[-1], dtype=cc.dtype, device=cc.device)
            gram, rhs = cc + self.ridge * eye, ct.unsqueeze(-1)
            beta, info = torch.linalg.solve_ex(gram, rhs)
            if bool((info != 0).any()):  # singular (ridge=0 and a degenerate control): min-norm
                beta = torch.linalg.pinv(gram, hermitian=True) @ rhs
            betas.append(beta.squeeze(-1))
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


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
