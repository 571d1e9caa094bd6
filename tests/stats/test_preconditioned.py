"""Preconditioned noise scale: record algebra, Adam's preconditioner, and the closed form."""

import pytest
import torch
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.preconditioned import adam_preconditioner, precondition
from gradnoise.stats.running import NoiseScale

from .conftest import per_example_grads


def test_precondition_equals_the_record_of_scaled_per_example_gradients():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    scale = torch.rand(3, 4, generator=gen, dtype=torch.float64) + 0.1
    got = precondition({"w": GradMoments.from_per_example(grads)}, {"w": scale})["w"]
    want = GradMoments.from_per_example(grads * scale)
    torch.testing.assert_close(got.grad_sum, want.grad_sum)
    torch.testing.assert_close(got.sq_norm_sum, want.sq_norm_sum)
    torch.testing.assert_close(got.elem_sq_sum, want.elem_sq_sum)


def test_adam_preconditioner_is_the_scale_of_adams_step():
    # with beta1 = 0 Adam's step is exactly -lr * p * g, p read from the state after the step
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.0, 0.9), eps=1e-3)
    assert all(
        torch.equal(p, torch.ones_like(p)) for p in adam_preconditioner(optimizer, model).values()
    )
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4, dtype=torch.float64)).pow(2).mean().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        scales = adam_preconditioner(optimizer, model)
        for name, param in model.named_parameters():
            step = before[name] - param.detach()
            torch.testing.assert_close(step, 0.1 * scales[name] * param.grad)


def test_preconditioned_noise_scale_on_linear_gaussian(linear_gaussian):
    # Closed form for P = diag(p) and any delta: tr(P Sigma P) = |P delta|^2 + (|delta|^2 + s^2)
    # sum p^2 and |P G|^2 = |P delta|^2. delta is not uniform here, so P changes the answer
    # (a uniform delta would give B_pre = B_simple for every p). Budget: 400 steps of B = 128;
    # relative sd ~ (B_pre / B) sqrt(2 / 400) < 1%, so 5% is > 5 sd.
    problem = linear_gaussian
    delta = torch.linspace(0.1, 1.0, problem.dim, dtype=torch.float64)
    delta = delta / delta.norm()
    p = torch.linspace(0.5, 2.0, problem.dim, dtype=torch.float64)
    pd2 = float((p * delta).pow(2).sum())
    truth = 1 + (1 + problem.sigma**2) * float(p.pow(2).sum()) / pd2
    assert abs(truth / problem.true_b_simple - 1) > 0.1  # the preconditioner matters here
    noise = NoiseScale(window=400)
    for step in per_example_grads(problem, 400, 128, seed=11, delta=delta):
        noise.update(precondition({"w": GradMoments.from_per_example(step)}, {"w": p}))
    assert abs(noise.estimate().b_simple / truth - 1) < 0.05


def test_precondition_errors():
    record = GradMoments(2, torch.zeros(3), torch.tensor(1.0))
    with pytest.raises(GradNoiseError, match=r"precondition\('w'\): expected moments with elem"):
        precondition({"w": record}, {"w": torch.ones(3)})
    full = GradMoments(2, torch.zeros(3), torch.tensor(1.0), torch.ones(3))
    with pytest.raises(GradNoiseError, match=r"expected a scale of the parameter's shape \(3,\)"):
        precondition({"w": full}, {"w": torch.ones(4)})
