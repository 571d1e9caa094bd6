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
        match=r"MARS.step: expected finite gradients, got NaN or inf gradients in "
        r"\[\"param_groups\[0\]\['params'\]\[0\]\", \"param_groups\[0\]\['params'\]\[1\]\"\] "
        r"\(shapes \[\(1, 3\), \(1,\)\]\); the step was skipped",
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
def _sparse_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(5, 2, sparse=True), nn.Linear(2, 1))


def _sparse_backward(model) -> None:
    model.zero_grad()
    model(torch.tensor([0, 3, 3])).pow(2).sum().backward()


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _unchanged(before, params) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("variant", ["adamw", "lion"])
def test_mars_sparse_gradient_is_a_clear_error(variant):
    model = _sparse_model()
    opt = MARS(model.parameters(), lr=0.1, variant=variant)
    _sparse_backward(model)
    before = _snapshot(model.parameters())
    with pytest.raises(
        GradNoiseError,
        match=r"MARS.step: expected dense gradients, got a sparse gradient for "
        r"param_groups\[0\]\['params'\]\[0\] of shape \(5, 2\) \(e.g. from "
        r"nn.Embedding\(sparse=True\)\); the step was skipped and nothing changed. Use a dense "
        r"embedding \(sparse=False\) for this optimizer, or a sparse optimizer such as "
        r"torch.optim.SparseAdam",
    ):
        opt.step()
    # the dense Linear after the embedding was not updated either: the whole step is refused
    assert _unchanged(before, model.parameters()) and not opt.state


def test_mars_names_the_sparse_parameter_of_a_later_group():
    model = _sparse_model()
    emb, lin = model[0], model[1]
    opt = MARS([{"params": list(lin.parameters())}, {"params": [emb.weight]}], lr=0.1)
    _sparse_backward(model)
    with pytest.raises(GradNoiseError, match=r"param_groups\[1\]\['params'\]\[0\] of shape"):
        opt.step()


@pytest.mark.parametrize(
    ("cls", "options"),
    [(VRGD, {}), (NoiseAdaptive, {"base": "sgd"}), (NoiseAdaptive, {"base": "adam"})],
)
def test_stats_fed_optimizers_refuse_sparse_gradients_with_moments_from_a_dict(cls, options):
    # GradStats itself refuses sparse embeddings; records measured on a dense twin reach the
    # optimizer only through a dict, which used to end in a raw NotImplementedError (addcmul_)
    dense = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 1))
    model = _sparse_model()
    dense.load_state_dict(model.state_dict())
    with GradStats(dense, elementwise=True) as stats:
        dense(torch.tensor([0, 3, 3])).pow(2).sum().backward()
    opt = cls(model.named_parameters(), lr=0.1, **options)
    _sparse_backward(model)
    before = _snapshot(model.parameters())
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.step: expected dense gradients, got a sparse gradient for "
        r"'0.weight' of shape \(5, 2\).*Use a dense embedding \(sparse=False\)",
    ):
        opt.step(moments=stats.moments())
    assert _unchanged(before, model.parameters()) and not opt.state


@pytest.mark.parametrize(
    ("cls", "options"),
    [(STORM, {"a": 0.3, "weight_decay": 0.1}), (SVRG, {"momentum": 0.9, "weight_decay": 0.1})],
)
def test_two_point_methods_handle_sparse_gradients_exactly_like_dense_ones(cls, options):
    # STORM and SVRG only add and scale gradients, which sparse tensors support: they are not
    # refused, and their trajectory equals the dense one up to rounding
    batches = [torch.tensor([0, 3, 3]), torch.tensor([1, 2, 0]), torch.tensor([4, 4, 1])]
    finals = []
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = nn.Embedding(5, 3, sparse=sparse)
        opt = cls(emb.parameters(), lr=0.05, **options)

        def closure_for(x, emb=emb, opt=opt):
            def closure():
                opt.zero_grad()
                loss = emb(x).pow(3).sum()
                loss.backward()
                return loss

            return closure

        if cls is SVRG:
            opt.snapshot(lambda emb=emb: sum(emb(x).pow(3).sum() for x in batches).backward())
        for x in batches * 2:
            opt.step(closure_for(x))
        finals.append(emb.weight.detach().clone())
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)


def test_mezo_ignores_gradient_layout_entirely():
    model = _sparse_model()
    opt = MeZO(model.parameters(), lr=1e-3)
    x = torch.tensor([0, 3, 3])
    opt.step(lambda: model(x).pow(2).sum())  # no backward: sparse embeddings are fine
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------ 5. frozen and unused parameters
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _measured_backward(model, stats_model=None):
    x, y = _batch()
    with GradStats(stats_model or model, elementwise=True) as stats:
        ((model(x) - y) ** 2).mean().backward()
    return stats


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_frozen_parameters_are_skipped(cls):
    model = _mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = cls(model.named_parameters(), lr=0.1)
    stats = _measured_backward(model)
    last = model[2].weight.detach().clone()
    opt.step(moments=stats)
    assert torch.equal(frozen, model[0].weight) and model[0].weight not in opt.state
    assert not torch.equal(last, model[2].weight.detach())


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_parameters_frozen_after_some_steps_are_skipped(cls):
    model = _mlp()
    opt = cls(model.named_parameters(), lr=0.1)
    opt.step(moments=_measured_backward(model))
    model[0].requires_grad_(False)
    opt.zero_grad()  # set_to_none=True, torch's default
    frozen = _snapshot(model[0].parameters())
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    opt.step(moments=_measured_backward(model))
    assert _unchanged(frozen, model[0].parameters())
    after = opt.state[model[0].weight]
    assert all(torch.equal(v, after[k]) for k, v in state.items())


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_frozen_parameter_with_a_stale_gradient_is_named(cls):
    # frozen after a backward, or zeroed with set_to_none=False: it still has a .grad, which
    # GradStats never measures (it is not trainable), so the step cannot be computed for it
    model = _mlp()
    opt = cls(model.named_parameters(), lr=0.1)
    opt.step(moments=_measured_backward(model))
    model[0].weight.requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    stats = _measured_backward(model)
    before = _snapshot(model.parameters())
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.step\(moments=...\): expected a record for every parameter that "
        r"has a gradient, got frozen parameters \['0.weight'\] \(requires_grad=False\) that "
        r"still hold a gradient.*Pass only trainable parameters, e.g. "
        rf"{cls.__name__}\(\[\(n, p\) for n, p in model.named_parameters\(\) if p.requires_grad",
    ):
        opt.step(moments=stats)
    assert _unchanged(before, model.parameters())


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


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_unused_parameter_inside_a_sequential_is_skipped(cls):
    # the case: a layer of an nn.Sequential ("0.weight") left out of this forward
    model = _mlp()
    opt = cls(model.named_parameters(), lr=0.1)
    x, y = _batch()
    with GradStats(model, elementwise=True) as stats:
        h = torch.tanh(x @ torch.ones(3, 4))  # model[0] is bypassed
        ((model[2](h) - y) ** 2).mean().backward()
    first = _snapshot(model[0].parameters())
    opt.step(moments=stats)
    assert _unchanged(first, model[0].parameters())
    assert model[0].weight not in opt.state and model[2].weight in opt.state


# ------------------------------------------------ 6. records that do not fit, checked up front
@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_records_of_another_shape_are_refused_before_any_change(cls):
    # NoiseAdaptive used to run silently on them, VRGD failed half-way with a raw RuntimeError
    model, other = _mlp(), nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = cls(model.named_parameters(), lr=0.1)
    x, _ = _batch()
    with GradStats(other, elementwise=True) as stats:
        other(x).sum().backward()
    model(x).sum().backward()
    before = _snapshot(model.parameters())
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.step: the record of '2.weight': expected moments of the "
        r"parameter's shape \(1, 4\), got shape \(2, 4\)",
    ):
        opt.step(moments=stats)
    assert _unchanged(before, model.parameters()) and not opt.state


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_records_of_one_example_are_refused_before_any_change(cls):
    model = _mlp()
    opt = cls(model.named_parameters(), lr=0.1)
    with GradStats(model, elementwise=True) as stats:
        model(torch.randn(1, 3)).sum().backward()
    before = _snapshot(model.parameters())
    with pytest.raises(GradNoiseError, match=r"record of '0.weight': expected moments of at least"):
        opt.step(moments=stats)
    assert _unchanged(before, model.parameters()) and not opt.state


def test_vrgd_needs_elementwise_records_of_every_parameter_before_any_change():
    model = _mlp()
    opt = VRGD(model.named_parameters(), lr=0.1)
    stats = _measured_backward(model)
    records = stats.moments()
    last = records["2.bias"]
    records["2.bias"] = type(last)(last.n, last.grad_sum, last.sq_norm_sum)  # no elem_sq_sum
    before = _snapshot(model.parameters())
    with pytest.raises(
        GradNoiseError,
        match=r"VRGD.step: the record of '2.bias': expected elementwise moments \(elem_sq_sum\), "
        r"got elem_sq_sum=None. Measure with GradStats\(model, elementwise=True\)",
    ):
        opt.step(moments=records)
    assert _unchanged(before, model.parameters()) and not opt.state


@pytest.mark.parametrize("cls", [VRGD, NoiseAdaptive])
def test_stats_fed_optimizers_refuse_nan_gradients_before_any_change(cls):
    model = _mlp()
    opt = cls(model.named_parameters(), lr=0.1)
    stats = _measured_backward(model)
    model[2].bias.grad.fill_(float("nan"))
    before = _snapshot(model.parameters())
    with pytest.raises(
        GradNoiseError,
        match=rf"{cls.__name__}.step: expected finite gradients, got NaN or inf gradients in "
        r"\[\"'2.bias'\"\]",
    ):
        opt.step(moments=stats)
    assert _unchanged(before, model.parameters()) and not opt.state


@pytest.mark.parametrize("step", ["vrgd_step", "noise_adaptive_step"])
def test_functional_steps_check_their_inputs_first(step):
    from gradnoise import optim

    model = _mlp()
    stats = _measured_backward(model)
    params = list(model.parameters())
    records = list(stats.moments().values())[::-1]  # wrong order: shapes do not fit
    states = [{} for _ in params]
    options = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    if step == "vrgd_step":
        options["gamma"] = 0.1
    else:
        options.update(beta=0.9, floor=0.05, base="adam", momentum=0.9)
    before = _snapshot(params)
    with pytest.raises(GradNoiseError, match=rf"{step}.step: the record of parameter 0: expected"):
        getattr(optim, step)(params, [p.grad for p in params], records, states, **options)
    assert _unchanged(before, params) and not any(states)
