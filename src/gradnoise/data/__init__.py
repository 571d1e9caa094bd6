"""Spending examples where the gradient is: importance sampling by gradient norm (from stale
scores, or fresh by presampling candidates), data pruning."""

from gradnoise.data.presampling import draw_candidates, presample, presampling_variance
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
    "draw_candidates",
    "el2n",
    "exact_sampling_variance",
    "importance_sampling_variance",
    "keep_set",
    "presample",
    "presampling_variance",
]
