"""Per-layer rules: (activations, output gradients) -> per-example gradient pieces.

Importing this package registers every rule; see :mod:`gradnoise.layers.registry`. A new rule is
one module here with one ``register(...)`` line, imported below.
"""

from gradnoise.layers import conv, elementwise, embedding, linear, norm  # noqa: F401  (registers)
from gradnoise.layers.plan import LOOP_MODULES, Plan, plan_coverage
from gradnoise.layers.registry import Pieces, Request, Rule, register, registered_rules, rule_for

__all__ = [
    "LOOP_MODULES",
    "Pieces",
    "Plan",
    "Request",
    "Rule",
    "plan_coverage",
    "register",
    "registered_rules",
    "rule_for",
]
