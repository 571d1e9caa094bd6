r"""Argument checks shared by :mod:`gradnoise.rl`: integers, real hyperparameters, budgets.

Every public entry point of :mod:`gradnoise.rl` validates its arguments with these before any
state changes, so a bad value is a :class:`~gradnoise.errors.GradNoiseError` naming the argument,
never a raw ``TypeError`` from deep inside, a silently truncated float or a NaN result.

* an **integer** is anything ``operator.index`` accepts (Python, NumPy and 0-d integer torch
  ints) except booleans: ``1.5`` and ``"2"`` are refused, never truncated or parsed;
* a **real** is a finite Python/NumPy real (not a bool), optionally inside a given interval.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

import numpy as np
import torch

from gradnoise.errors import GradNoiseError, explain

__all__ = [
    "as_int",
    "as_real_tensor",
    "check_budget",
    "check_int",
    "check_real",
    "check_reward_range",
]


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer (not a bool), else ``None``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.dim() != 0):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(value, *, where: str, name: str, minimum: int | None = None, fix: str) -> int:
    """Return ``value`` as an int, refusing non-integers and values below ``minimum``."""
    out = as_int(value)
    if out is None or (minimum is not None and out < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise GradNoiseError(
            explain(
                f"{where}({name})",
                expected=f"an integer{bound}",
                got=f"{value!r} ({type(value).__name__})",
                fix=fix,
            )
        )
    return out


def check_real(
    value,
    *,
    where: str,
    name: str,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
    fix: str,
) -> float:
    """Return ``value`` as a float, refusing non-reals, NaN, infinities and values outside the
    interval from ``lo`` to ``hi`` (each end closed unless ``lo_open`` / ``hi_open``)."""
    ok = isinstance(value, Real) and not isinstance(value, (bool, np.bool_))
    out = float(value) if ok else math.nan
    ok = ok and math.isfinite(out)
    ok = ok and (out > lo if lo_open else out >= lo) and (out < hi if hi_open else out <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        if math.isinf(lo) and math.isinf(hi):
            interval = ""
        elif math.isinf(hi):
            interval = f" {'>' if lo_open else '>='} {lo:g}"
        else:
            interval = f" in {left}{lo:g}, {hi:g}{right}"
        raise GradNoiseError(
            explain(
                f"{where}({name})",
                expected=f"a finite real number{interval}",
                got=f"{value!r} ({type(value).__name__})",
                fix=fix,
            )
        )
    return out


def check_budget(budget, *, where: str) -> int:
    """A rollout budget: an integer >= 0 (``64.5``, ``None``, NaN and ``"64"`` are refused)."""
    return check_int(
        budget,
        where=where,
        name="budget",
        minimum=0,
        fix="pass the number of rollouts still allowed this step as an int, "
        "e.g. budget - stats.total",
    )


def check_reward_range(reward_range, *, where: str) -> tuple[float, float]:
    """A reward range ``(lo, hi)``: two finite reals with ``lo < hi``."""
    try:
        lo, hi = reward_range
    except (TypeError, ValueError):
        lo = hi = None
    fine = all(isinstance(v, Real) and not isinstance(v, bool) for v in (lo, hi))
    if not fine or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise GradNoiseError(
            explain(
                f"{where}(reward_range)",
                expected="reward_range (lo, hi) of finite numbers with reward_range lo < hi",
                got=repr(reward_range),
                fix="declare the range the rewards really take, e.g. (0.0, 1.0)",
            )
        )
    return float(lo), float(hi)


def as_real_tensor(value, *, where: str, what: str, listing: str, fix: str) -> torch.Tensor:
    """``value`` (a tensor or nested lists of numbers) as a real tensor, dtype unchanged; junk or
    complex numbers are a GradNoiseError saying ``what`` was expected (``listing`` names the
    accepted list form)."""
    tensor, reason = None, ""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        reason = str(err)
    if tensor is None or tensor.is_complex():
        raise GradNoiseError(
            explain(
                where,
                expected=f"{what} as a real tensor or {listing}",
                got=f"{type(value).__name__}"
                + (f": {reason}" if tensor is None else f" of dtype {tensor.dtype}"),
                fix=fix,
            )
        )
    return tensor
