r"""Run several estimators on one problem and tabulate variance, cost and variance x cost.

For each estimator, ``repeats`` independent estimates with ``num_samples`` samples each give

* ``reported_variance``: the mean over repeats of :attr:`Estimate.total_variance`, the estimator's
  own :math:`\sum_j \widehat{\mathrm{Var}}[\hat g_j]` from its GradMoments;
* ``empirical_variance``: :math:`\sum_j` of the across-repeat sample variance of :math:`\hat g_j`
  (the check that the reported number is honest);
* ``evals``: evaluations of ``f`` per estimate, and ``variance_x_cost`` = reported variance times
  evaluations (the work-normalized variance; lower is better);
* ``bias``: :math:`\|\bar{\hat g} - \nabla\|` when the true gradient is given.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gradnoise.errors import GradNoiseError, explain
from gradnoise.estimators.core import DistLike, SampleFn, resolve

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True)
class Comparison:
    """One row of :func:`compare`'s table."""

    name: str
    reported_variance: float
    empirical_variance: float
    evals: int
    variance_x_cost: float
    bias: float | None
    seconds: float


def _flat(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _true_grad(true_grad, dist: DistLike) -> list[torch.Tensor] | None:
    """``true_grad`` as a list of tensors shaped like the distribution's parameters."""
    if true_grad is None:
        return None
    params = resolve(dist, "compare")[1]
    if isinstance(true_grad, torch.Tensor):
        true_grad = [true_grad]  # one parameter: a lone tensor is accepted
    given = list(true_grad) if isinstance(true_grad, Sequence) else None
    if given is None or not all(isinstance(t, torch.Tensor) for t in given):
        raise GradNoiseError(
            explain(
                "compare true_grad",
                expected=f"a list of {len(params)} tensors, one per parameter",
                got=type(true_grad).__name__,
                fix="pass e.g. true_grad=[2 * (mu.detach() - 1)]",
            )
        )
    _check_shapes("the distribution's parameters", [p.shape for p in params], given)
    return given


def _check_shapes(whose: str, want: Sequence[torch.Size], given: Sequence[torch.Tensor]) -> None:
    got = [tuple(t.shape) for t in given]
    want = [tuple(s) for s in want]
    if got != want:
        raise GradNoiseError(
            explain(
                "compare true_grad",
                expected=f"one tensor per parameter, shaped like {whose}: {want}",
                got=str(got),
                fix="give the exact gradient of every parameter in order (a shape that differs "
                "would be broadcast into a wrong bias)",
            )
        )


def _row(name, estimates, true_grad, seconds) -> Comparison:
    if true_grad is not None:
        _check_shapes(f"{name!r}'s gradients", [g.shape for g in estimates[0].grads], true_grad)
    means = torch.stack([_flat(e.grads) for e in estimates])
    reported = sum(e.total_variance for e in estimates) / len(estimates)
    bias = None if true_grad is None else float((means.mean(0) - _flat(true_grad)).norm())
    evals = estimates[0].num_evals
    return Comparison(
        name, reported, float(means.var(0).sum()), evals, reported * evals, bias, seconds
    )


def compare(
    estimators: Mapping[str, object],
    f: SampleFn,
    dist: DistLike,
    num_samples: int = 16,
    *,
    repeats: int = 20,
    warmup: int = 1,
    true_grad: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> list[Comparison]:
    """Estimate ``repeats`` times with each estimator (same ``f``, ``dist`` and budget).

    ``warmup`` unmeasured calls first let stateful pieces (moving averages, control-variate
    coefficients, which start uncorrected) reach their working state.
    """
    whole = all(isinstance(n, int) and not isinstance(n, bool) for n in (repeats, warmup))
    if not whole or repeats < 2 or warmup < 0 or not estimators:
        raise GradNoiseError(
            explain(
                "compare",
                expected="at least one estimator and repeats >= 2, warmup >= 0 (both ints)",
                got=f"{len(estimators)} estimators, repeats={repeats!r}, warmup={warmup!r}",
                fix="pass e.g. {'reinforce': ScoreFunction()}, repeats=20 and warmup=1",
            )
        )
    true_grad = _true_grad(true_grad, dist)  # checked before any estimator runs
    rows = []
    for name, est in estimators.items():
        for _ in range(warmup):
            est(f, dist, num_samples, generator=generator)
        start = time.perf_counter()
        estimates = [est(f, dist, num_samples, generator=generator) for _ in range(repeats)]
        rows.append(_row(name, estimates, true_grad, (time.perf_counter() - start) / repeats))
    return rows
