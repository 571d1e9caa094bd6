"""Draws from the linear-Gaussian problem (B_simple = 1 + d + d s^2/|delta|^2)."""

import pytest
import torch

from gradnoise.stats.moments import GradMoments
from gradnoise.testing.problems import LinearGaussian


def per_example_grads(
    problem: LinearGaussian, steps: int, batch: int, seed: int, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """``(steps, batch, dim)`` per-example gradients g = x (x^T delta - eps), seeded.

    ``delta`` defaults to the problem's; any delta keeps G = delta and
    Sigma = delta delta^T + (|delta|^2 + sigma^2) I (Isserlis).
    """
    delta = problem.delta if delta is None else delta
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, problem.dim, generator=gen, dtype=problem.dtype)
    eps = problem.sigma * torch.randn(steps, batch, 1, generator=gen, dtype=problem.dtype)
    return x * (x @ delta.unsqueeze(1) - eps)


def step_moments(grads: torch.Tensor) -> list[GradMoments]:
    """One GradMoments per step, built with batched tensor ops."""
    sums = grads.sum(1)
    sq = grads.pow(2).sum((1, 2))
    return [GradMoments(grads.shape[1], sums[s], sq[s]) for s in range(grads.shape[0])]


@pytest.fixture
def linear_gaussian():
    return LinearGaussian()


@pytest.fixture
def lg_steps():
    """``lg_steps(problem, steps, batch, seed)`` -> list of per-step GradMoments."""

    def make(problem, steps, batch, seed):
        return step_moments(per_example_grads(problem, steps, batch, seed))

    return make
