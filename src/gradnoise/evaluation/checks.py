"""Input checks shared by the evaluation statistics; each refusal says what, got and how to fix."""

from __future__ import annotations

import math

import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = ["check_resamples", "make_generator", "scores_vector"]


def check_resamples(where: str, resamples: int) -> int:
    """At least 100 bootstrap resamples (a 95% percentile interval needs its 2.5% tails)."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise GradNoiseError(
            explain(
                f"{where} resamples",
                expected="an integer >= 100",
                got=repr(resamples),
                fix="use resamples=2000 (the default); percentile intervals need their tails",
            )
        )
    return resamples


def make_generator(where: str, seed: int | None, generator: torch.Generator | None):
    """The generator to draw from: ``generator``, else a fresh one seeded with ``seed`` (0 if
    None), so an evaluation is reproducible by default. Passing both is refused."""
    if generator is not None and seed is not None:
        raise GradNoiseError(
            explain(
                where,
                expected="seed= or generator=, not both",
                got=f"seed={seed!r} and a generator",
                fix="pass only one of them",
            )
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise GradNoiseError(
                explain(
                    f"{where} generator",
                    expected="a torch.Generator",
                    got=type(generator).__name__,
                    fix="pass torch.Generator().manual_seed(0), or seed=0",
                )
            )
        return generator
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GradNoiseError(
            explain(
                f"{where} seed",
                expected="an integer",
                got=repr(seed),
                fix="pass for example seed=0",
            )
        )
    return torch.Generator().manual_seed(0 if seed is None else seed)


def scores_vector(where: str, values, *, minimum: int = 2) -> torch.Tensor:
    """``values`` as a 1-D float64 CPU tensor of at least ``minimum`` finite numbers."""
    try:
        x = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise GradNoiseError(
            explain(
                where,
                expected="a 1-D sequence of numbers (a list or a tensor)",
                got=f"{type(values).__name__} ({error})",
                fix="pass one number per unit, for example [0.0, 1.0, 1.0]",
            )
        ) from error
    if x.dim() != 1:
        raise GradNoiseError(
            explain(
                where,
                expected="a 1-D sequence of numbers",
                got=f"shape {tuple(x.shape)}",
                fix="pass one number per unit (average or flatten first)",
            )
        )
    if x.numel() < minimum:
        raise GradNoiseError(
            explain(
                where,
                expected=f"at least {minimum} values",
                got=f"{x.numel()}",
                fix="a spread needs several units: evaluate more items or seeds",
            )
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise GradNoiseError(
            explain(
                where,
                expected="finite values",
                got=f"{bad} NaN or inf value(s)",
                fix="drop or fix the non-finite scores first",
            )
        )
    return x


def sample_sd(x: torch.Tensor) -> float:
    """The sample standard deviation (divisor n - 1) of a 1-D tensor of at least 2 values."""
    return math.sqrt(max(float(x.var(unbiased=True)), 0.0))
