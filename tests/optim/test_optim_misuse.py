"""Misuse errors of the optimizer shells (the hyperparameter errors live in the contract suite)."""

import pytest
import torch
from torch import nn

from gradnoise.errors import GradNoiseError, NotReadyError
from gradnoise.optim import MARS, STORM, SVRG, VRGD, NoiseAdaptive, mars_correction


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


@pytest.mark.parametrize("cls", [STORM, SVRG])
def test_two_point_methods_need_a_closure(cls):
    opt = cls(_model().parameters(), lr=0.1)
    if cls is SVRG:
        opt.snapshot(lambda: None)
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.step: expected a closure .*"
        r"got closure=None\. Call opt.step\(closure\)",
    ):
        opt.step()


def test_svrg_step_before_snapshot_is_refused_without_state_change():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SVRG(model.parameters(), lr=0.1)
    with pytest.raises(
        NotReadyError,
        match="expected a snapshot taken with opt.snapshot.*got no snapshot. Call opt.snapshot",
    ):
        opt.step(lambda: model(torch.ones(2, 3)).sum().backward())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [NoiseAdaptive, VRGD])
def test_stats_fed_optimizers_need_moments_of_every_named_parameter(cls):
    model = _model()
    opt = cls(model.named_parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.step\(moments=...\): expected "
        r"GradStats or \{name: GradMoments\}.*got gradients but no record for "
        r"\['weight', 'bias'\]",
    ):
        opt.step(moments={})


@pytest.mark.parametrize("cls", [NoiseAdaptive, VRGD])
def test_stats_fed_optimizers_need_named_parameters(cls):
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}\(params\): expected named parameters .*got parameters without "
        r"names. Construct it with model.named_parameters\(\)",
    ):
        cls(_model().parameters(), lr=0.1)


def test_mars_correction_is_clipped_to_the_norm_bound():
    grad, prev = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])
    c = mars_correction(grad, prev, gamma=0.0, beta1=0.9, clip=1.0)
    torch.testing.assert_close(c, torch.tensor([0.6, 0.8]))
    unclipped = mars_correction(grad, prev, gamma=0.1, beta1=0.5, clip=None)
    torch.testing.assert_close(unclipped, grad * 1.1)


def test_mars_gamma_zero_without_clip_is_adamw():
    models = [_model(), _model()]
    mars = MARS(models[0].parameters(), lr=0.01, gamma=0.0, clip=None, betas=(0.9, 0.99))
    adamw = torch.optim.AdamW(models[1].parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0)
    for step in range(4):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        for model, opt in zip(models, (mars, adamw), strict=True):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b)
