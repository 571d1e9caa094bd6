"""Monte Carlo and zeroth-order gradient estimators that report their own variance.

Every estimator is called as ``est(f, dist, num_samples=K, *, generator=None) -> Estimate``
(see :mod:`gradnoise.estimators.core`); baselines, control variates and samplers are small objects
passed to the estimator's constructor. :class:`MeZO` takes ``(loss, params)`` instead of
``(f, dist)`` because its "distribution" is a model's parameters.
"""

from gradnoise.estimators.baselines import (
    Constant,
    LeaveOneOut,
    MovingAverage,
    NoBaseline,
    OptimalPerCoordinate,
    OptimalScalar,
)
from gradnoise.estimators.compare import Comparison, compare
from gradnoise.estimators.control_variates import ControlVariate
from gradnoise.estimators.core import Estimate, Estimator
from gradnoise.estimators.pathwise import Pathwise
from gradnoise.estimators.relaxations import GumbelSoftmax, StraightThrough
from gradnoise.estimators.sampling import IID, QMC, Antithetic, Sampler
from gradnoise.estimators.score_function import ScoreFunction
from gradnoise.estimators.zeroth_order import SPSA, ForwardGradient, MeZO

__all__ = [
    "IID",
    "QMC",
    "SPSA",
    "Antithetic",
    "Comparison",
    "Constant",
    "ControlVariate",
    "Estimate",
    "Estimator",
    "ForwardGradient",
    "GumbelSoftmax",
    "LeaveOneOut",
    "MeZO",
    "MovingAverage",
    "NoBaseline",
    "OptimalPerCoordinate",
    "OptimalScalar",
    "Pathwise",
    "Sampler",
    "ScoreFunction",
    "StraightThrough",
    "compare",
]
