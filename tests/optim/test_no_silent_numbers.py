"""Optimizer cases of "no silently wrong number": NaN gradients, bad param groups, closures,
sparse gradients and frozen parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.optim import MARS, STORM, SVRG, VRGD, MeZO, NoiseAdaptive
from gradnoise.stats import GradStats


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _batch():
    torch.manual_seed(1)
    return torch.randn(8, 3), torch.randn(8, 1)


def _backward(model, scale=1.0):
    x, y = _batch()
    model.zero_grad()
    ((model(x) - y) ** 2).mean().mul(scale).backward()


# ------------------------------------------------------------------------- 1. NaN in MARS
@pytest.mark.parametrize("variant", ["lion", "adamw"])
def test_mars_nan_gradient_is_refused_and_training_continues(variant):
    model = _model()
    opt = MARS(model.parameters(), lr=0.01, variant=variant)
    _backward(model)
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model.weight].items() if torch.is_tensor(v)}
    _backward(model, scale=float("nan"))
    with pytest.raises(
        GradNoiseError,
        match=r"MARS.step: expected finite gradients, got NaN or inf gradients at positions "
        r"\[0, 1\].*the step was skipped",
    ):
        opt.step()
    # nothing changed: neither the parameters nor the optimizer state
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.state[model.weight]
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    assert opt.state[model.weight]["step"] == 1
    # the next good batch trains again: parameters move and stay finite
    _backward(model)
    opt.step()
    moved = [not torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True)]
    assert all(moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mars_nan_in_a_later_group_leaves_earlier_groups_untouched():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = MARS([{"params": [a]}, {"params": [b]}], lr=0.1, variant="lion")
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, float("inf")])
    with pytest.raises(GradNoiseError, match="expected finite gradients"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(2)) and not opt.state[a]


# ---------------------------------------------------------------- 2. per-group hyperparameters
GROUP_CASES = [
    (MARS, {"variant": "bogus"}, "variant", r"'adamw' or 'lion'"),
    (MARS, {"lr": -1.0}, "lr", "a positive learning rate"),
    (MARS, {"betas": (0.9, 1.5)}, "betas", r"two floats in \[0, 1\)"),
    (MARS, {"clip": 0.0}, "clip", "None or a positive norm"),
    (MARS, {"gamma": "x"}, "gamma", "a float >= 0"),
    (STORM, {"a": 0.0}, "a", r"a momentum correction in \(0, 1\]"),
    (SVRG, {"momentum": 1.0}, "momentum", r"a float in \[0, 1\)"),
    (VRGD, {"gamma": 2.0}, "gamma", r"a bound in \[0, 1\)"),
    (NoiseAdaptive, {"base": "rmsprop"}, "base", "'sgd' or 'adam'"),
    (NoiseAdaptive, {"floor": 0.0}, "floor", r"a gain floor in \(0, 1\]"),
    (NoiseAdaptive, {"weight_decay": -0.1}, "weight_decay", "a float >= 0"),
]


def _params_for(cls, model):
    if cls in (VRGD, NoiseAdaptive):
        return list(model.named_parameters())
    return list(model.parameters())


@pytest.mark.parametrize(("cls", "bad", "name", "expected"), GROUP_CASES)
def test_invalid_param_group_is_refused_at_construction(cls, bad, name, expected):
    model = _model()
    params = _params_for(cls, model)
    groups = [{"params": params[:1]}, {"params": params[1:], **bad}]
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.param_groups\[1\]\({name}=...\): expected {expected}, got",
    ):
        cls(groups, lr=0.1)


@pytest.mark.parametrize(("cls", "bad", "name", "expected"), GROUP_CASES)
def test_invalid_param_group_is_refused_by_add_param_group(cls, bad, name, expected):
    model = _model()
    params = _params_for(cls, model)
    opt = cls(params[:1], lr=0.1)
    with pytest.raises(GradNoiseError, match=rf"param_groups\[1\]\({name}=...\): expected"):
        opt.add_param_group({"params": params[1:], **bad})
    assert len(opt.param_groups) == 1


def test_mezo_param_group_lr_and_weight_decay_are_checked():
    model = _model()
    w, b = model.parameters()
    with pytest.raises(GradNoiseError, match=r"MeZO param_groups\[1\] lr: expected a positive"):
        MeZO([{"params": [w]}, {"params": [b], "lr": 0.0}], lr=0.1)
    opt = MeZO([w], lr=0.1)
    with pytest.raises(GradNoiseError, match=r"param_groups\[1\] weight_decay: expected a float"):
        opt.add_param_group({"params": [b], "weight_decay": -1.0})


def test_valid_param_groups_still_work():
    model = _model()
    w, b = model.parameters()
    opt = MARS([{"params": [w], "variant": "lion"}, {"params": [b], "lr": 1e-2}], lr=1e-3)
    assert [g["variant"] for g in opt.param_groups] == ["lion", "adamw"]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]


# -------------------------------------------------------------------- 3. closures of VRGD & co
@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_stats_fed_optimizers_call_the_closure_and_return_its_loss(cls):
    model = _model()
    opt = cls(model.named_parameters(), lr=0.1)
    x, y = _batch()
    before, bias = model.weight.detach().clone(), model.bias.detach().clone()
    with GradStats(model, elementwise=True) as stats:

        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        loss = opt.step(closure, moments=stats)
    with torch.no_grad():
        expected = ((x @ before.T + bias - y) ** 2).mean()
    assert torch.is_tensor(loss) and loss.item() == pytest.approx(expected.item())
    assert not torch.equal(before, model.weight.detach())  # the closure's gradients were used


# --------------------------------------------------------------------- 4. sparse gradients
@pytest.mark.parametrize("variant", ["adamw", "lion"])
def test_mars_sparse_gradient_is_a_clear_error(variant):
    emb = nn.Embedding(5, 2, sparse=True)
    opt = MARS(emb.parameters(), lr=0.1, variant=variant)
    emb(torch.tensor([0, 3])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(
        GradNoiseError,
        match=r"MARS.step: expected dense gradients, got a sparse gradient for parameter 0 of "
        r"shape \(5, 2\). Use a dense embedding",
    ):
        opt.step()
    assert torch.equal(before, emb.weight.detach()) and not opt.state[emb.weight]


# ------------------------------------------------------------ 5. frozen and unused parameters
@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_frozen_parameters_are_skipped(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = cls(model.named_parameters(), lr=0.1)
    x, y = _batch()
    with GradStats(model, elementwise=True) as stats:
        ((model(x) - y) ** 2).mean().backward()
    last = model[2].weight.detach().clone()
    opt.step(moments=stats)
    assert torch.equal(frozen, model[0].weight)
    assert not torch.equal(last, model[2].weight.detach())


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_unused_parameters_are_skipped(cls):
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 1), nn.Linear(3, 1)
    model = nn.ModuleDict({"used": used, "unused": unused})
    opt = cls(model.named_parameters(), lr=0.1)
    x, y = _batch()
    with GradStats(model, elementwise=True) as stats:
        ((used(x) - y) ** 2).mean().backward()
    idle = unused.weight.detach().clone()
    opt.step(moments=stats)
    assert torch.equal(idle, unused.weight) and unused.weight not in opt.state
    assert "exp_avg" in opt.state[used.weight] or "momentum_buffer" in opt.state[used.weight]
