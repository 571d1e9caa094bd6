"""sample_linears / unsample_linears on a small GPT, and the budget rule on one batch."""

import re

import pytest
import torch
from torch import nn

from gradnoise import GradStats
from gradnoise.errors import GradNoiseError
from gradnoise.sampled import (
    SampledLinear,
    choose_budgets,
    record_rows,
    sample_linears,
    sampled_layers,
    unsample_linears,
)
from gradnoise.stats.quantities import trace_covariance
from gradnoise.testing.models import lm_loss, make_gpt


def _gpt():
    torch.manual_seed(0)
    model, batch, _ = make_gpt(4, vocab=20, dim=16, layers=1, context=8)
    return model, batch


def test_round_trip_keeps_parameters_state_dict_and_optimizer():
    model, batch = _gpt()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    swapped = sample_linears(model, 0.5, generator=torch.Generator().manual_seed(0))
    assert sorted(swapped) == sorted(linears) == sorted(sampled_layers(model))
    assert list(model.parameters()) == params and model.state_dict().keys() == before.keys()
    lm_loss(model, *batch).backward()
    opt.step()  # the optimizer built before the swap trains the same tensors
    assert not torch.equal(model.head.weight, before["head.weight"])
    restored = unsample_linears(model)
    assert sorted(restored) == sorted(linears) and not sampled_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)
    assert list(model.parameters()) == params


def test_a_mapping_converts_only_the_named_layers():
    model, _ = _gpt()
    swapped = sample_linears(model, {"head": 0.25, "blocks.0.q": 1.0})
    assert sorted(swapped) == ["blocks.0.q", "head"]
    assert model.head.budget == 0.25 and type(model.blocks[0].k) is nn.Linear


def test_converter_errors():
    model, _ = _gpt()
    with pytest.raises(GradNoiseError, match=re.escape("got ['nope']")):
        sample_linears(model, {"nope": 0.5})
    with pytest.raises(GradNoiseError, match=re.escape("expected a number in (0, 1]")):
        sample_linears(model, 2.0)
    with pytest.raises(GradNoiseError, match="expected a model with nn.Linear submodules"):
        sample_linears(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(GradNoiseError, match="expected a torch.nn.Module"):
        sample_linears([nn.Linear(2, 2)], 0.5)
    assert type(model.head) is nn.Linear  # refused calls changed nothing


def _own_budget(layer, fraction):
    return next(
        (f for f in sorted(layer.curve) if layer.curve[f] <= fraction * layer.sgd_noise), 1.0
    )


def test_the_rule_picks_the_smallest_budget_under_the_fraction():
    model, batch = _gpt()
    sample_linears(model, 0.3)
    closure = lambda: lm_loss(model, *batch)  # noqa: E731
    alone = choose_budgets(model, closure, fraction=0.2, share=False)
    assert len({alone[f"blocks.0.{n}"].budget for n in "qkv"}) > 1  # sharing below is a change
    assert all(layer.budget == 0.3 for layer in sampled_layers(model).values())  # restored
    assert len(alone) == 7
    for layer in alone.values():
        own = 1.0 if layer.input_saved_elsewhere else _own_budget(layer, 0.2)
        assert layer.sgd_noise > 0 and layer.budget == own
        if layer.budget < 1:
            assert layer.curve[layer.budget] <= 0.2 * layer.sgd_noise and layer.ratio <= 0.2
    # q, k and v read one LayerNorm output: shared, they get the largest of their budgets
    shared = choose_budgets(model, closure, fraction=0.2)
    qkv = max(alone[f"blocks.0.{n}"].budget for n in "qkv")
    assert all(shared[f"blocks.0.{n}"].budget == qkv for n in "qkv")
    assert all(shared[n].budget == alone[n].budget for n in alone if n[-1] not in "qkv")
    strict = choose_budgets(model, closure, fraction=1e-9)
    assert all(layer.budget == 1.0 and layer.added == 0.0 for layer in strict.values())


def test_the_rule_measures_the_sgd_noise_gradstats_gives():
    model, batch = _gpt()
    chosen = choose_budgets(model, lambda: lm_loss(model, *batch))
    model.zero_grad()
    with GradStats(model) as stats:
        lm_loss(model, *batch).backward()
    moments = stats.moments()
    for name, layer in chosen.items():
        expected = float(trace_covariance(moments[f"{name}.weight"])) / 4
        assert layer.sgd_noise == pytest.approx(expected, rel=1e-6)


def test_record_rows_returns_each_layers_input_and_output_gradient():
    model, batch = _gpt()
    recording = record_rows(model, lambda: lm_loss(model, *batch))
    a, g = recording.rows["head"]
    assert a.shape == (4, 8, 16) and g.shape == (4, 8, 20)
    assert torch.allclose(g.flatten(0, 1).T @ a.flatten(0, 1), model.head.weight.grad, atol=1e-6)
    assert recording.stats.batch_size == 4


def test_layers_whose_input_another_op_saves_stay_exact():
    """SDPA saves its output, which the output projection reads through a view: sampling `o`
    would free nothing, so the rule leaves it exact. Likewise after tanh (its backward uses its
    output), not after SiLU (its backward uses its input)."""
    model, batch = _gpt()
    recording = record_rows(model, lambda: lm_loss(model, *batch))
    assert recording.saved_elsewhere == {"blocks.0.o"}
    chosen = choose_budgets(model, lambda: lm_loss(model, *batch), fraction=0.99)
    assert chosen["blocks.0.o"].budget == 1.0 and chosen["blocks.0.o"].input_saved_elsewhere
    assert chosen["head"].budget < 1 and not chosen["head"].input_saved_elsewhere
    x = torch.randn(16, 3)
    for activation, expected in ((nn.Tanh(), {"2"}), (nn.SiLU(), set())):
        mlp = nn.Sequential(nn.Linear(3, 8), activation, nn.Linear(8, 1))
        assert record_rows(mlp, lambda m=mlp: m(x).pow(2).mean()).saved_elsewhere == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fraction": 0.0}, "expected a number in (0, 1) (added variance / SGD noise)"),
        ({"fraction": 1.0}, "expected a number in (0, 1)"),
        ({"method": "x"}, "choose_budgets(method=...)"),
        ({"proposal": "x"}, "choose_budgets(proposal=...)"),
        ({"grid": (0.5, 2.0)}, "choose_budgets(grid=...)"),
    ],
)
def test_rule_errors(options, message):
    model, batch = _gpt()
    with pytest.raises(GradNoiseError, match=re.escape(message)):
        choose_budgets(model, lambda: lm_loss(model, *batch), **options)
    assert all(p.grad is None for p in model.parameters())  # refused before any backward


def test_sampled_gpt_trains_and_its_gradient_is_unbiased_on_a_batch():
    model, batch = _gpt()
    lm_loss(model, *batch).backward()
    exact = model.head.weight.grad.clone()
    sample_linears(model, 0.25, generator=torch.Generator().manual_seed(3))
    draws = []
    for _ in range(400):
        model.zero_grad()
        lm_loss(model, *batch).backward()
        draws.append(model.head.weight.grad.clone())
    draws = torch.stack(draws)
    se = draws.std(0) / 400**0.5
    assert bool(((draws.mean(0) - exact).abs() <= 4 * se + 1e-7).all())
    assert isinstance(model.head, SampledLinear)


def test_the_rule_leaves_no_tensors_alive():
    """The saved-tensor probe must not tie saved outputs to their grad_fn (an uncollectable
    cycle that kept one forward's activations per call)."""
    import gc

    model, batch = _gpt()
    choose_budgets(model, lambda: lm_loss(model, *batch))

    def live() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    before = live()
    for _ in range(3):
        choose_budgets(model, lambda: lm_loss(model, *batch))
    assert live() == before
