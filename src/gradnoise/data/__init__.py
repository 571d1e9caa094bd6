"""Spending examples where the gradient is: importance sampling by gradient norm, data pruning."""

from gradnoise.data.pruning import RULES, el2n, keep_set
from gradnoise.data.sampling import (
    ImportanceSampler,
    SamplingVariance,
    exact_sampling_variance,
    importance_sampling_variance,
)

__all__ = [
    "RULES",
    "ImportanceSampler",
    "SamplingVariance",
    "el2n",
    "exact_sampling_variance",
    "importance_sampling_variance",
    "keep_set",
]
