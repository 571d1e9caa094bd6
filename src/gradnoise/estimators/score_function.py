r"""The score-function (REINFORCE, likelihood-ratio) estimator.

Williams 1992; Mohamed et al. 2020, section 4:

.. math::
    \nabla_\theta E_{p_\theta}[f(x)] = E_{p_\theta}[f(x)\, \nabla_\theta \log p_\theta(x)],\qquad
    t_k = (f(x_k) - b_k)\, \nabla_\theta \log p_\theta(x_k).

``f`` needs no gradient (it may be a black box); ``dist`` needs ``log_prob``. Baselines
(:mod:`~gradnoise.estimators.baselines`), control variates and the sampler are passed in.
"""

from __future__ import annotations

import numbers

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.estimators.baselines import NoBaseline
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
    resolve,
)
from gradnoise.estimators.sampling import IID, Sampler

__all__ = ["ScoreFunction", "scores"]


def scores(dist, samples: torch.Tensor, params) -> list[torch.Tensor]:
    r"""Per-sample :math:`\nabla_\theta \log p_\theta(x_k)`, each ``(K, *shape)``."""
    log_prob = dist.log_prob(samples).reshape(samples.shape[0], -1).sum(1)
    return per_sample_grads(log_prob, params)


def _times(values: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``values[k] * grads[k]`` with ``values`` ``(K,)`` or ``(K, m)`` (then a trailing m dim)."""
    if values.dim() == 1:
        return values.reshape(-1, *([1] * (grads.dim() - 1))) * grads
    v = values.reshape(values.shape[0], *([1] * (grads.dim() - 1)), values.shape[1])
    return v * grads.unsqueeze(-1)


def _check_baselines(baselines, scores: list[torch.Tensor]) -> list:
    """One baseline per parameter, each a number, a 0-dim tensor or a tensor of the scores' rank
    that broadcasts to them, ``(K, 1, ..., 1)`` or ``(K, *shape)``: a per-sample ``(K,)`` against
    ``(K, D)`` scores would broadcast along the coordinates instead (silently, when ``K == D``).
    """
    count = len(baselines) if isinstance(baselines, (list, tuple)) else None
    if count != len(scores):
        raise GradNoiseError(
            explain(
                "ScoreFunction baseline",
                expected=f"a list with one baseline per parameter ({len(scores)})",
                got=f"a list of {count}" if count is not None else type(baselines).__name__,
                fix="return a list like the built-in baselines do, "
                "[b.reshape(-1, *[1] * (s.dim() - 1)) for s in scores]",
            )
        )
    for i, (b, g) in enumerate(zip(baselines, scores, strict=True)):
        if isinstance(b, numbers.Real) and not isinstance(b, bool):
            continue
        ok = isinstance(b, torch.Tensor) and b.dim() in (0, g.dim())
        if ok and b.dim():
            try:
                ok = torch.broadcast_shapes(b.shape, g.shape) == g.shape
            except RuntimeError:
                ok = False
        if not ok:
            want = (g.shape[0], *([1] * (g.dim() - 1)))
            raise GradNoiseError(
                explain(
                    f"ScoreFunction baseline for parameter {i}",
                    expected=f"a number or a tensor of shape (), {want} or {tuple(g.shape)}",
                    got=f"shape {tuple(b.shape)}"
                    if isinstance(b, torch.Tensor)
                    else type(b).__name__,
                    fix="put the sample dimension first and give every parameter dimension "
                    f"its own axis, e.g. b.reshape{want}",
                )
            )
    return baselines


class ScoreFunction:
    """REINFORCE with a baseline, an optional control variate and a sampler (all small objects)."""

    name = "score_function"

    def __init__(
        self,
        baseline=None,
        *,
        control_variate: ControlVariate | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        self.baseline = NoBaseline() if baseline is None else baseline
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
        dist, params = resolve(dist, "ScoreFunction")
        check_num_samples("ScoreFunction", num_samples, self.sampler.block)
        x, values, s = self.draw(f, dist, params, num_samples, generator=generator)
        cv = self.control_variate
        if cv is not None:  # checked before the baseline, which may update its own state
            h = cv.values(x, num_samples).detach()
            means = cv.mean_grads(dist, params, h.shape[1])
        baselines = _check_baselines(self.baseline(values, s), s)
        terms = [_times(values, g) - b * g for g, b in zip(s, baselines, strict=True)]
        if cv is not None:
            terms = cv.correct(terms, [_times(h, g) for g in s], means)
        return finish(params, terms, block=self.sampler.block, num_evals=num_samples)

    def draw(self, f, dist, params, num_samples: int, *, generator=None):
        """``(samples, f values (K,), scores [(K, *shape)])``, drawn chunk by chunk."""
        xs, values, s = [], [], []
        for size in chunk_sizes(num_samples, self.sampler.block):
            x = self.sampler.sample(dist, size, generator=generator, reparam=False).detach()
            xs.append(x)
            values.append(evaluate("ScoreFunction", f, x, size).detach())
            s.append(scores(dist, x, params))
        return torch.cat(xs), torch.cat(values), [torch.cat(g) for g in zip(*s, strict=True)]
