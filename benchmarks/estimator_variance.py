"""Variance, cost and variance x cost of every estimator on the Mohamed et al. (2020) problems.

Problems (Mohamed, Rosca, Figurnov & Mnih 2020, "Monte Carlo Gradient Estimation in Machine
Learning", section 3): x ~ N(mu, diag(sigma^2)) in D=5 with f(x) = sum (x - k)^2 ("quadratic"),
sum exp(-w x^2) ("exponential"), sum cos(w x) ("cosine"), and Bayesian logistic regression
(f(w) = log-likelihood of 100 synthetic points); gradients are w.r.t. mu (sigma fixed), which is
also exactly what SPSA and forward gradients estimate (the gradient of the Gaussian-smoothed f).
Plus a categorical-latent problem for the discrete estimators: z ~ OneHotCategorical(theta) with
10 categories and f(z) = (z.r - 0.45)^2, true gradient by enumeration.

Every estimator runs ``--repeats`` times with K samples per estimate (:func:`compare`). Columns:
reported variance of the mean (the estimator's own GradMoments), the across-repeat empirical
variance, f-evaluations, reported variance x evaluations, bias (vs the exact gradient, or a
2e5-sample pathwise reference for logistic regression), and wall time per estimate.

    python benchmarks/estimator_variance.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.distributions import Independent, Normal, OneHotCategorical

from gradnoise.estimators import (
    QMC,
    SPSA,
    Antithetic,
    ControlVariate,
    ForwardGradient,
    GumbelSoftmax,
    LeaveOneOut,
    MovingAverage,
    OptimalPerCoordinate,
    OptimalScalar,
    Pathwise,
    ScoreFunction,
    StraightThrough,
    compare,
)
from gradnoise.estimators.core import resolve

D = 5
MU = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
SIGMA = torch.full((D,), 0.8, dtype=torch.float64)
K_SHIFT, OMEGA = 2.0, 1.5


def logistic_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, D, generator=generator, dtype=torch.float64)
    labels = torch.where(x @ torch.ones(D, dtype=torch.float64) > 0, 1.0, -1.0)
    return x, labels


X, LABELS = logistic_data()
FUNCTIONS = {
    "quadratic": lambda x: (x - K_SHIFT).pow(2).sum(-1),
    "exponential": lambda x: torch.exp(-OMEGA * x.pow(2)).sum(-1),
    "cosine": lambda x: torch.cos(OMEGA * x).sum(-1),
    "logistic_regression": lambda w: -torch.nn.functional.softplus(-LABELS * (w @ X.T)).sum(-1),
}


def exact_gaussian_grad(name: str) -> torch.Tensor | None:
    """d/dmu E f for the separable test functions (closed forms); None for logistic regression."""
    s2 = SIGMA**2
    if name == "quadratic":
        return 2 * (MU - K_SHIFT)
    if name == "exponential":
        a = 1 + 2 * OMEGA * s2
        return -2 * OMEGA * MU / a**1.5 * torch.exp(-OMEGA * MU**2 / a)
    if name == "cosine":
        return -OMEGA * torch.sin(OMEGA * MU) * torch.exp(-(OMEGA**2) * s2 / 2)
    return None


def moment_control_variate() -> ControlVariate:
    """h(x) = [x, x^2, 1] per coordinate, E h = [mu, mu^2 + sigma^2, 1] (a quadratic surrogate;
    the constant makes it subsume a baseline for the score function)."""

    def expectation(dist):
        mu, sigma = dist.base_dist.loc, dist.base_dist.scale
        return torch.cat([mu, mu.pow(2) + sigma.pow(2), torch.ones(1, dtype=mu.dtype)])

    def h(x):
        return torch.cat([x, x.pow(2), torch.ones_like(x[:, :1])], -1)

    return ControlVariate(h, expectation)


def gaussian_estimators() -> dict:
    return {
        "score": ScoreFunction(),
        "score+moving_average": ScoreFunction(MovingAverage(0.9)),
        "score+rloo(mean)": ScoreFunction(LeaveOneOut()),
        "score+optimal_scalar": ScoreFunction(OptimalScalar()),
        "score+optimal_per_coord": ScoreFunction(OptimalPerCoordinate()),
        "score+antithetic": ScoreFunction(sampler=Antithetic()),
        "score+control_variate": ScoreFunction(control_variate=moment_control_variate()),
        "pathwise": Pathwise(),
        "pathwise+antithetic": Pathwise(sampler=Antithetic()),
        "pathwise+qmc": Pathwise(sampler=QMC(points=16)),
        "pathwise+control_variate": Pathwise(control_variate=moment_control_variate()),
        "spsa": SPSA(),
        "forward_gradient": ForwardGradient(),
    }


R_VALUES = torch.linspace(0.0, 1.0, 10, dtype=torch.float64)


def categorical_f(z: torch.Tensor) -> torch.Tensor:
    return (z @ R_VALUES - 0.45).pow(2)


def categorical_estimators() -> dict:
    return {
        "score": ScoreFunction(),
        "score+moving_average": ScoreFunction(MovingAverage(0.9)),
        "score+rloo(mean)": ScoreFunction(LeaveOneOut()),
        "score+optimal_scalar": ScoreFunction(OptimalScalar()),
        "score+optimal_per_coord": ScoreFunction(OptimalPerCoordinate()),
        "gumbel_softmax(t=0.5)": GumbelSoftmax(0.5),
        "straight_through(t=0.5)": StraightThrough(0.5),
    }


def gaussian_problem(name: str, num_samples: int, repeats: int, seed: int) -> list[dict]:
    mu = MU.clone().requires_grad_()
    dist = lambda: Independent(Normal(mu, SIGMA), 1)  # noqa: E731
    true = exact_gaussian_grad(name)
    if true is None:  # logistic regression: a 2e5-sample pathwise reference
        reference = Pathwise()(FUNCTIONS[name], dist, 200_000, generator=torch.Generator())
        true = reference.grads[0]
    generator = torch.Generator().manual_seed(seed)
    rows = compare(gaussian_estimators(), FUNCTIONS[name], dist, num_samples,
                   repeats=repeats, true_grad=[true], generator=generator)  # fmt: skip
    return [dataclasses.asdict(row) for row in rows], population_baselines(FUNCTIONS[name], dist)


def categorical_problem(num_samples: int, repeats: int, seed: int) -> list[dict]:
    theta = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64).requires_grad_()
    p = torch.softmax(theta.detach(), 0)
    values = categorical_f(torch.eye(10, dtype=torch.float64))
    true = p * (values - p @ values)
    generator = torch.Generator().manual_seed(seed)
    dist = lambda: OneHotCategorical(logits=theta)  # noqa: E731
    rows = compare(categorical_estimators(), categorical_f, dist,
                   num_samples, repeats=repeats, true_grad=[true], generator=generator)  # fmt: skip
    return [dataclasses.asdict(row) for row in rows], population_baselines(categorical_f, dist)


def population_baselines(f, dist, num_samples: int = 200_000) -> dict:
    r"""The per-term second moment :math:`E\|(f - b)s\|^2` of the score-function term for b = 0,
    the mean of f, the optimal scalar and the per-coordinate optimum, all computed on one large
    sample with the baselines fitted on it: the population ordering, free of the O(1/K)
    estimation noise of the leave-one-out versions."""
    dist_obj, params = resolve(dist, "population_baselines")
    generator = torch.Generator().manual_seed(9)
    _, values, scores = ScoreFunction().draw(f, dist_obj, params, num_samples, generator=generator)
    s = torch.cat([g.flatten(1) for g in scores], 1)
    sq = s.pow(2)
    baselines = {
        "none": torch.zeros(()),
        "mean": values.mean(),
        "optimal_scalar": (values * sq.sum(1)).sum() / sq.sum(),
        "optimal_per_coord": (values[:, None] * sq).sum(0) / sq.sum(0),
    }
    return {
        k: float(((values[:, None] - b) * s).pow(2).sum(1).mean()) for k, b in baselines.items()
    }


def summarize(rows: list[dict]) -> dict:
    by = {row["name"]: row for row in rows}
    base = by["score"]["reported_variance"]
    for row in rows:
        row["variance_vs_score"] = row["reported_variance"] / base
    mean = by["score+rloo(mean)"]["reported_variance"]
    return {
        "optimal_scalar_vs_mean_baseline": by["score+optimal_scalar"]["reported_variance"] / mean,
        "optimal_per_coord_vs_mean_baseline": by["score+optimal_per_coord"]["reported_variance"]
        / mean,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = results["problems"]
    fig, axes = plt.subplots(1, len(problems), figsize=(4 * len(problems), 5), sharey=False)
    for ax, (name, problem) in zip(axes, problems.items(), strict=True):
        rows = problem["rows"]
        ax.barh([r["name"] for r in rows], [r["variance_x_cost"] for r in rows])
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("variance x evaluations (log)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 repeats")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 10 if args.quick else args.repeats
    start = time.perf_counter()
    problems = {}
    for name in FUNCTIONS:
        rows, population = gaussian_problem(name, args.num_samples, repeats, args.seed)
        problems[name] = {"rows": rows, "population_second_moment": population}
    rows, population = categorical_problem(args.num_samples, repeats, args.seed)
    problems["categorical"] = {"rows": rows, "population_second_moment": population}
    for name, problem in problems.items():
        problem["summary"] = summarize(problem["rows"])
        print(
            f"\n{name}: {problem['summary']}\n  population: {problem['population_second_moment']}"
        )
        for r in problem["rows"]:
            print(f"  {r['name']:>26} var {r['reported_variance']:.3e} "
                  f"(emp {r['empirical_variance']:.3e}) x{r['variance_vs_score']:.3f} "
                  f"evals {r['evals']:4d} bias {r['bias']:.2e}")  # fmt: skip
    results = {"num_samples": args.num_samples, "repeats": repeats, "problems": problems,
               "seconds": time.perf_counter() - start}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        "estimator_variance_quick" if args.quick else "estimator_variance"
    )  # --quick never overwrites full results
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    plot(results, out / f"{stem}.png")


if __name__ == "__main__":
    main()
