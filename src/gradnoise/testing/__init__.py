"""Slow references and closed-form problems that every fast path is checked against.

Nothing in the package imports this subpackage; tests and benchmarks do.
"""

from gradnoise.testing.problems import LinearGaussian
from gradnoise.testing.reference import per_example_grads, reference_moments

__all__ = ["LinearGaussian", "per_example_grads", "reference_moments"]
