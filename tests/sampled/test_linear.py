"""SampledLinear against the exact layer on a fixed batch, where every expectation is known.

The batch: N = 48 rows (4 x 12) of 5 features whose norms span ~30x (a few outlier rows, as in
pretrained transformers), a fixed output gradient. Conditionally on it, the sampled weight
gradient's mean is G^T A and its trace variance is the docstring formula of
gradnoise.sampled.rows. R seeded draws are compared with both within 4 standard errors
estimated from the same draws: SE of the mean from the per-entry sample variance, SE of the
variance estimate from the sample variance of the squared deviations.
"""

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.sampled import SampledLinear, added_variance, inclusion_probabilities
from gradnoise.sampled.rows import kept_rows, wta_split

DRAWS = 1500
SETTINGS = [(m, p) for m in ("bernoulli", "wta-crs") for p in ("norm", "uniform")]


def _batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 12, 5, generator=generator, dtype=torch.float64)
    x[0, :3] *= 12.0  # outlier rows: WTA-CRS keeps them exactly, Bernoulli gives them pi = 1
    x[2, 5] = 0.0  # a zero row: never kept, contributes nothing
    grad_out = torch.randn(4, 12, 3, generator=generator, dtype=torch.float64)
    linear = nn.Linear(5, 3).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(3, 5, generator=generator, dtype=torch.float64))
        linear.bias.copy_(torch.randn(3, generator=generator, dtype=torch.float64))
    return x, grad_out, linear


@functools.cache
def _draws(method: str, proposal: str, budget: float = 0.25) -> torch.Tensor:
    x, grad_out, linear = _batch()
    layer = SampledLinear.from_linear(
        linear, budget=budget, method=method, proposal=proposal,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    grads = []
    for _ in range(DRAWS):
        layer.weight.grad = None
        layer(x).backward(grad_out)
        grads.append(layer.weight.grad.flatten().clone())
    return torch.stack(grads)


def _exact_grad() -> torch.Tensor:
    x, grad_out, _ = _batch()
    return (grad_out.reshape(-1, 3).T @ x.reshape(-1, 5)).flatten()


@pytest.mark.parametrize(("method", "proposal"), SETTINGS)
def test_weight_gradient_is_unbiased_within_4_standard_errors(method, proposal):
    draws = _draws(method, proposal)
    se = draws.std(0) / DRAWS**0.5
    assert bool((se > 0).all())  # the estimate is random in every entry
    error = (draws.mean(0) - _exact_grad()).abs()
    assert bool((error <= 4 * se).all()), (error / se).max()


@pytest.mark.parametrize(("method", "proposal"), SETTINGS)
def test_measured_added_variance_matches_the_formula(method, proposal):
    draws = _draws(method, proposal)
    deviations = (draws - draws.mean(0)).pow(2).sum(1)  # ||X_m - mean||^2
    measured = deviations.sum() / (DRAWS - 1)
    se = deviations.std() / DRAWS**0.5
    x, grad_out, _ = _batch()
    formula = added_variance(x, grad_out, 0.25, method=method, proposal=proposal)
    assert abs(float(measured - formula)) <= 4 * float(se), (measured, formula, se)
    assert float(se) < 0.1 * float(formula)  # the check has power


def test_bernoulli_formula_is_sum_of_inverse_inclusion_terms():
    x, grad_out, _ = _batch()
    a, g = x.reshape(-1, 5), grad_out.reshape(-1, 3)
    pi = inclusion_probabilities(a.norm(dim=1), kept_rows(0.25, 48))
    kept = pi > 0
    expected = ((1 / pi[kept] - 1) * a.norm(dim=1)[kept] ** 2 * g.norm(dim=1)[kept] ** 2).sum()
    assert torch.allclose(added_variance(x, grad_out, 0.25), expected)
    assert torch.allclose(pi.sum(), torch.tensor(12.0, dtype=torch.float64))
    assert bool((pi[:3] == 1).all()) and float(pi[29]) == 0.0  # outliers certain, zero row never


def test_wta_split_keeps_the_outliers_exactly():
    x, _, _ = _batch()
    scores = x.reshape(-1, 5).norm(dim=1)
    exact, mass = wta_split(scores / scores.sum(), 12)
    assert set(exact.tolist()) >= {0, 1, 2}
    assert 0 < float(mass) < 1


@pytest.mark.parametrize("method", ["bernoulli", "wta-crs"])
def test_input_and_bias_gradients_are_exact(method):
    x, grad_out, linear = _batch()
    layer = SampledLinear.from_linear(linear, budget=0.1, method=method)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(x1)
    assert torch.equal(out, F.linear(x, linear.weight, linear.bias))  # forward is F.linear
    out.backward(grad_out)
    bias_grad = linear.bias.grad.clone()
    linear.bias.grad = linear.weight.grad = None
    nn.Linear.forward(linear, x2).backward(grad_out)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bias_grad, linear.bias.grad, rtol=1e-12, atol=1e-12)


def _never_unpacked(packed):
    """Unpack hook of a forward that is never differentiated (its graph is dropped unused)."""
    raise RuntimeError("this forward records what autograd saves; it cannot be differentiated")


def _saved_bytes(run, params) -> int:
    """Bytes of the distinct storages autograd saves in ``run()``, parameters left out."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        # keep the memory alive as autograd would, without the tensor: a saved output returned
        # as is would tie it to its own grad_fn, a cycle Python cannot collect
        return tensor.untyped_storage()

    with torch.autograd.graph.saved_tensors_hooks(pack, _never_unpacked):
        run()
    return sum(seen.values())


def test_only_the_kept_rows_are_saved_and_shared_inputs_share_them():
    x = torch.randn(8, 32, 16)  # N = 256 rows
    layers = [nn.Linear(16, 16) for _ in range(3)]
    params = [p for layer in layers for p in layer.parameters()]
    exact = _saved_bytes(lambda: [layer(x) for layer in layers], params)
    assert exact == 256 * 16 * 4  # one input saved for the three exact layers
    sampled = [SampledLinear.from_linear(layer, budget=0.25, method="wta-crs") for layer in layers]
    kept = _saved_bytes(lambda: [layer(x) for layer in sampled], params)
    assert kept == 64 * 16 * 4 + 64 * 8  # k = 64 scaled rows and their int64 indices, once
    for layer in sampled:
        layer.share = False
    assert _saved_bytes(lambda: [layer(x) for layer in sampled], params) == 3 * kept


def test_eval_mode_and_no_grad_run_the_plain_layer():
    x, grad_out, linear = _batch()
    layer = SampledLinear.from_linear(linear, budget=0.1).eval()
    layer(x).backward(grad_out)
    assert torch.allclose(linear.weight.grad, _exact_grad().reshape(3, 5))
    with torch.no_grad():
        assert torch.equal(layer.train()(x), F.linear(x, linear.weight, linear.bias))


def test_state_dict_and_parameters_are_those_of_nn_linear():
    linear = nn.Linear(5, 3)
    layer = SampledLinear(5, 3, budget=0.3)
    assert layer.state_dict().keys() == linear.state_dict().keys()
    layer.load_state_dict(linear.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(layer.parameters(), linear.parameters(), strict=True)
    )
    shared = SampledLinear.from_linear(linear, budget=0.3)
    assert shared.weight is linear.weight and shared.bias is linear.bias
    back = shared.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight
    assert "budget=0.3" in repr(shared)


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, True, "0.5", float("nan")])
def test_bad_budget_is_refused_with_expected_got_fix(budget):
    with pytest.raises(GradNoiseError, match=re.escape("expected a number in (0, 1]")):
        SampledLinear(5, 3, budget=budget)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"method": "crs"}, "expected one of ('bernoulli', 'wta-crs'), got 'crs'"),
        ({"proposal": "grad"}, "expected one of ('norm', 'uniform'), got 'grad'"),
        ({"generator": 3}, "expected a torch.Generator or None, got int"),
    ],
)
def test_bad_options_are_refused(option, message):
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        SampledLinear.from_linear(nn.Linear(5, 3), **option)
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        SampledLinear(5, 3, **option)


def test_added_variance_refuses_an_unknown_method():
    x, grad_out, _ = _batch()
    with pytest.raises(GradNoiseError, match="added_variance"):
        added_variance(x, grad_out, 0.5, method="exact")
