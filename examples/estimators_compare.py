"""Swap gradient estimators in one line and see each one's variance and cost side by side.

Problem: x ~ N(mu, 0.8^2) in 5 dimensions, f(x) = sum cos(1.5 x); gradient w.r.t. mu.
"""

import torch
from torch.distributions import Independent, Normal

from gradnoise.estimators import (
    QMC,
    SPSA,
    Antithetic,
    LeaveOneOut,
    OptimalScalar,
    Pathwise,
    ScoreFunction,
    compare,
)

mu = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64, requires_grad=True)


def dist():
    return Independent(Normal(mu, torch.full_like(mu, 0.8)), 1)


def f(x):
    return torch.cos(1.5 * x).sum(-1)


estimators = {
    "reinforce": ScoreFunction(),
    "reinforce+rloo": ScoreFunction(LeaveOneOut()),
    "reinforce+optimal": ScoreFunction(OptimalScalar()),
    "pathwise": Pathwise(),
    "pathwise+antithetic": Pathwise(sampler=Antithetic()),
    "pathwise+qmc": Pathwise(sampler=QMC(points=16)),
    "spsa": SPSA(),
}
rows = compare(estimators, f, dist, 64, repeats=8, generator=torch.Generator().manual_seed(0))
print(f"{'estimator':>20} {'variance':>10} {'evals':>5} {'var x cost':>10}")
for row in rows:
    print(
        f"{row.name:>20} {row.reported_variance:10.2e} {row.evals:5d} {row.variance_x_cost:10.2e}"
    )

# one estimate, with its own variance (from the same GradMoments record GradStats uses)
est = Pathwise()(f, dist, 256, generator=torch.Generator().manual_seed(1))
print(
    "gradient:",
    est.grads[0].numpy().round(3),
    "+/-",
    est.variance_of_mean[0].sqrt().numpy().round(3),
)
