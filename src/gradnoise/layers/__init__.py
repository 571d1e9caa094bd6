"""Per-layer rules: (activations, output gradients) -> per-example gradient pieces.

Importing this package registers every rule; see :mod:`gradnoise.layers.registry`.
"""

from gradnoise.layers import conv, embedding, linear, norm  # noqa: F401  (registers the rules)
from gradnoise.layers.plan import RULED_MODULES, SUBTREE_FALLBACK, Plan, plan_coverage
from gradnoise.layers.registry import Pieces, Request, Rule, register, rule_for

__all__ = [
    "RULED_MODULES",
    "SUBTREE_FALLBACK",
    "Pieces",
    "Plan",
    "Request",
    "Rule",
    "plan_coverage",
    "register",
    "rule_for",
]
