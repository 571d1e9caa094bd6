r"""Seeded, in-place random perturbations of parameters: the memory-free core of MeZO.

MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes") estimates the
gradient of :math:`L(\theta)` from two forward passes along a Gaussian direction :math:`z`,

.. math::
    p = \frac{L(\theta + \epsilon z) - L(\theta - \epsilon z)}{2\epsilon},\qquad
    \hat g = p\, z,

and never stores :math:`z`: it is regenerated from a seed, one parameter at a time, each time it is
needed (perturb, flip, restore, update). Peak memory is therefore that of inference plus one
parameter-sized buffer. Sparse-MeZO (Liu et al. 2024) perturbs only a mask of the parameters
(by default the smallest-magnitude fraction of each tensor); pass the same ``masks`` to every call
of one step.

This module is shared by ``gradnoise.estimators`` and ``gradnoise.optim``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = [
    "direction",
    "directions",
    "magnitude_masks",
    "perturb_",
    "projected_gradient",
    "zo_update_",
]

_PRIME = 1_000_003


def direction(
    param: torch.Tensor, seed: int, index: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The Gaussian direction ``z`` of parameter number ``index`` for ``seed`` (regenerable)."""
    generator = torch.Generator(device=param.device)
    generator.manual_seed((seed * _PRIME + index) % (2**63 - 1))
    z = torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)
    return z if mask is None else z.mul_(mask)


def directions(
    params: Sequence[torch.Tensor], seed: int, masks: Sequence[torch.Tensor] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(param, z)`` one parameter at a time, so only one ``z`` is alive at once."""
    for index, param in enumerate(params):
        yield param, direction(param, seed, index, None if masks is None else masks[index])


@torch.no_grad()
def perturb_(
    params: Sequence[torch.Tensor],
    seed: int,
    scale: float,
    masks: Sequence[torch.Tensor] | None = None,
) -> None:
    r"""In place: :math:`\theta \leftarrow \theta + \text{scale}\cdot z(\text{seed})`."""
    for param, z in directions(params, seed, masks):
        param.add_(z, alpha=scale)


@torch.no_grad()
def projected_gradient(
    loss: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    seed: int,
    eps: float,
    masks: Sequence[torch.Tensor] | None = None,
) -> tuple[float, float, float]:
    r"""Two in-place forward passes; returns :math:`(p, L^+, L^-)`. ``params`` end unchanged.

    ``loss()`` must evaluate the loss at the current parameter values (no arguments).
    """
    if not eps > 0:
        raise GradNoiseError(
            explain(
                "MeZO eps",
                expected="a positive perturbation scale",
                got=repr(eps),
                fix="use e.g. eps=1e-3",
            )
        )
    perturb_(params, seed, eps, masks)
    plus = _evaluate(loss, params, seed, eps, masks)
    perturb_(params, seed, -2 * eps, masks)
    minus = _evaluate(loss, params, seed, -eps, masks)
    perturb_(params, seed, eps, masks)
    return (plus - minus) / (2 * eps), plus, minus


def _evaluate(loss, params, seed: int, offset: float, masks) -> float:
    """``loss()`` at parameters perturbed by ``offset``; on an error they are put back first."""
    try:
        return _scalar(loss())
    except BaseException:
        perturb_(params, seed, -offset, masks)
        raise


def _scalar(value) -> float:
    """The loss as a float, refusing anything but one number (a batch of losses, say)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    raise GradNoiseError(
        explain(
            "MeZO loss()",
            expected="one number: the mean loss of the batch",
            got=f"{shape}",
            fix="reduce the loss first, e.g. loss_fn(...).mean()",
        )
    )


@torch.no_grad()
def zo_update_(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    coefficients: Sequence[float],
    masks: Sequence[torch.Tensor] | None = None,
) -> None:
    r"""In place: :math:`\theta \leftarrow \theta - \sum_s c_s\, z(\text{seed}_s)`.

    One seed is plain MeZO-SGD (:math:`c = \eta p`); several give the seed-history momentum.
    """
    for seed, coefficient in zip(seeds, coefficients, strict=True):
        perturb_(params, seed, -coefficient, masks)


@torch.no_grad()
def magnitude_masks(params: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """Sparse-MeZO masks: the ``density`` fraction of smallest-magnitude entries of each tensor."""
    if not 0.0 < density <= 1.0:
        raise GradNoiseError(
            explain(
                "Sparse-MeZO density",
                expected="a fraction in (0, 1]",
                got=repr(density),
                fix="use e.g. density=0.25 to perturb the smallest quarter of each tensor",
            )
        )
    masks = []
    for param in params:
        flat = param.detach().abs().flatten()
        k = max(1, round(density * flat.numel()))
        threshold = flat.kthvalue(k).values
        masks.append(param.detach().abs() <= threshold)
    return masks
