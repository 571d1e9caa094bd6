"""Cheaper training steps whose added noise is measured: sampled backprop and timestep sampling.

* :class:`SampledLinear` / :func:`sample_linears`: the weight gradient of linear layers from k of
  the N activation rows (unbiased; only the kept rows are saved), and :func:`choose_budgets`,
  which picks k per layer so the added variance stays below a share of the SGD noise that
  GradStats measures.
* :class:`TimestepSampler`: diffusion timestep buckets drawn in proportion to their measured
  gradient scale, reweighted to stay unbiased.
"""

from gradnoise.sampled.budget import (
    DEFAULT_GRID,
    LayerBudget,
    Recording,
    choose_budgets,
    record_rows,
)
from gradnoise.sampled.convert import sample_linears, sampled_layers, unsample_linears
from gradnoise.sampled.linear import SampledLinear
from gradnoise.sampled.rows import (
    METHODS,
    PROPOSALS,
    added_variance,
    inclusion_probabilities,
    sample_rows,
)
from gradnoise.sampled.timesteps import (
    TimestepSampler,
    bucket_sampling_variance,
    bucket_second_moments,
)

__all__ = [
    "DEFAULT_GRID",
    "METHODS",
    "PROPOSALS",
    "LayerBudget",
    "Recording",
    "SampledLinear",
    "TimestepSampler",
    "added_variance",
    "bucket_sampling_variance",
    "bucket_second_moments",
    "choose_budgets",
    "inclusion_probabilities",
    "record_rows",
    "sample_linears",
    "sample_rows",
    "sampled_layers",
    "unsample_linears",
]
