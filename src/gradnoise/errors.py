"""Exception types and the helpers that write messages in the expected / got / how-to-fix form.

Every error raised by gradnoise says three things: what was expected, what was given, and what the
user can do about it. ``explain`` builds that message so the three parts always appear in the same
order, which also keeps the tests that match on them short.
"""

from __future__ import annotations

__all__ = [
    "BatchCouplingError",
    "GradNoiseError",
    "NonFiniteGradientError",
    "NotReadyError",
    "UnsupportedModuleError",
    "explain",
    "require",
]


class GradNoiseError(ValueError):
    """Base class of every error gradnoise raises on bad input or misuse."""


class UnsupportedModuleError(GradNoiseError):
    """A module owns parameters that no rule covers and the fallback is disabled."""


class BatchCouplingError(GradNoiseError):
    """A module mixes examples of the batch, so per-example gradients are not defined."""


class NonFiniteGradientError(GradNoiseError):
    """A step's gradients hold NaN or inf: its statistics are undefined (running estimators
    such as ``NoiseScale`` and ``Monitor`` skip such a step and count it)."""


class NotReadyError(GradNoiseError, RuntimeError):
    """Results were asked for before they exist (for example, before any backward pass)."""


def explain(what: str, *, expected: str, got: str, fix: str) -> str:
    """Return ``"<what>: expected <expected>, got <got>. <fix>"`` with consistent punctuation."""
    fix = fix.rstrip(".") + "."
    return f"{what}: expected {expected}, got {got}. {fix[0].upper()}{fix[1:]}"


def require(ok: bool, what: str, expected: str, got: str, fix: str) -> None:
    """Raise ``GradNoiseError(explain(what, ...))`` unless ``ok``: a check in one call."""
    if not ok:
        raise GradNoiseError(explain(what, expected=expected, got=got, fix=fix))


def check_confidence(where: str, confidence: object) -> float:
    """``confidence`` as a float in (0, 1), else a GradNoiseError naming ``where`` (the one
    check of every confidence level in the package)."""
    number = isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
    require(
        number and 0.0 < confidence < 1.0,
        where,
        expected="a number in (0, 1)",
        got=repr(confidence),
        fix="use for example confidence=0.95",
    )
    return float(confidence)
