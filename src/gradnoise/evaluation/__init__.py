"""The variance of evaluations: how sure a benchmark score, or a difference of two, is.

* :mod:`~gradnoise.evaluation.intervals`: ``bootstrap_interval`` over items, ``seed_interval``
  over seeds, ``variance_components`` of an (items, seeds) matrix.
* :mod:`~gradnoise.evaluation.paired`: ``paired_comparison`` of two systems on the same items
  (paired bootstrap, paired t, exact sign test), ``minimum_detectable_difference``.
* :mod:`~gradnoise.evaluation.passk`: unbiased ``pass_at_k`` (Chen et al. 2021) and
  ``pass_at_k_interval`` over problems.
* :mod:`~gradnoise.evaluation.results`: ``read_results`` of a JSON-lines results file (bad lines
  skipped and counted); :mod:`~gradnoise.evaluation.summary`: ``summarize``, what
  ``gradnoise evaluate`` prints (``plots.plot_evaluation`` draws it).

See docs/evaluation.md. Nothing here imports matplotlib or rich (``plots`` and ``display`` do).
"""

from gradnoise.evaluation.intervals import (
    Interval,
    VarianceComponents,
    bootstrap_interval,
    seed_interval,
    t_quantile,
    variance_components,
)
from gradnoise.evaluation.paired import (
    PairedComparison,
    minimum_detectable_difference,
    paired_comparison,
    sign_test_p_value,
)
from gradnoise.evaluation.passk import PassAtK, pass_at_k, pass_at_k_interval
from gradnoise.evaluation.results import EvaluationResults, Record, read_results
from gradnoise.evaluation.summary import Evaluation, summarize

__all__ = [
    "Evaluation",
    "EvaluationResults",
    "Interval",
    "PairedComparison",
    "PassAtK",
    "Record",
    "VarianceComponents",
    "bootstrap_interval",
    "minimum_detectable_difference",
    "paired_comparison",
    "pass_at_k",
    "pass_at_k_interval",
    "read_results",
    "seed_interval",
    "sign_test_p_value",
    "summarize",
    "t_quantile",
    "variance_components",
]
