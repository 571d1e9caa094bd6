"""Gauss-Hermite expectations: exact for polynomials, machine-precise for smooth test functions.

``expect(fn, dims)`` returns E[fn(eps)] for eps ~ N(0, I_dims) (dims 1 or 2) by tensor-product
quadrature with probabilists' Hermite nodes; with 80 nodes it is exact for polynomials of degree
< 160, so the "true" means and variances the tests compare against are closed forms.
"""

import math

import numpy as np
import pytest
import torch

NODES, WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
WEIGHTS = WEIGHTS / math.sqrt(2 * math.pi)


def expect(fn, dims=1):
    x = torch.tensor(NODES, dtype=torch.float64)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    if dims == 1:
        return (w * fn(x)).sum(-1)
    a, b = torch.meshgrid(x, x, indexing="ij")
    return (torch.outer(w, w) * fn(a, b)).sum((-1, -2))


def moments_of(term, dims=1):
    """(mean, variance, std of a K-sample variance estimate times sqrt(K)) of term(eps)."""
    mean = expect(term, dims)
    centre = mean[(..., *([None] * dims))]  # broadcast against the quadrature grid
    var = expect(lambda *e: (term(*e) - centre) ** 2, dims)
    fourth = expect(lambda *e: (term(*e) - centre) ** 4, dims)
    return mean, var, torch.sqrt(fourth - var**2)


@pytest.fixture
def gauss():
    return type("Gauss", (), {"expect": staticmethod(expect), "moments": staticmethod(moments_of)})
