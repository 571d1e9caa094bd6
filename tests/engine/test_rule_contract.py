"""The rule contract: every registered rule, on the cases it declares, against the reference loop.

Nothing here names a rule: a rule registered in ``gradnoise.layers`` is picked up by
``registered_rules()`` and must bring ``contract_cases()``; each case is a float64 module whose
forward calls the rule's functions on its own parameters, checked with both reductions and
elementwise squares at the float64 budget (1e-9 relative), and measured by the rule itself, never
by the fallback.
"""

import pytest
import torch

from gradnoise import GradStats
from gradnoise.layers import registered_rules
from gradnoise.testing.check import reference_errors

CASES = [
    pytest.param(rule, index, id=f"{rule.name}-{index}")
    for rule in registered_rules()
    for index in range(len(rule.contract_cases()))
]


def _loss(model, x, y):
    """A nonlinear scalar per example, so the per-example gradients differ."""
    out = model(x)
    return (torch.sin(out.flatten(1)) * y.flatten(1)).sum(1).mean()


def test_every_rule_declares_what_the_contract_needs():
    for rule in registered_rules():
        assert rule.name and rule.intercepts and rule.param_roles, rule
        assert isinstance(rule.gives_input_grad, bool) and isinstance(rule.broadcasts, bool)
        assert rule.contract_cases(), f"rule {rule.name!r} declares no contract cases"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("rule", "index"), CASES)
def test_rule_matches_the_reference_loop(rule, index, reduction):
    torch.manual_seed(index)
    label, model, inputs = rule.contract_cases()[index]
    x = inputs[0]
    y = torch.randn_like(model(x).detach())
    errors = reference_errors(model, _loss, (x, y), loss_reduction=reduction, elementwise=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(errors) == sorted(trainable), label
    worst = max(e for per in errors.values() for e in per.values())
    assert worst < 1e-9, (label, errors)
    with GradStats(model) as stats:
        _loss(model, x, y).backward()
    methods = set(stats.coverage().values())
    assert not any(m.startswith("fallback") for m in methods), (label, methods)


BROADCAST_CASES = [
    pytest.param(rule, index, id=f"{rule.name}-{index}")
    for rule in registered_rules()
    if rule.broadcasts and rule.gives_input_grad
    for index, (_, _, inputs) in enumerate(rule.contract_cases())
    if inputs[0].is_floating_point()  # an index input (embedding) has no gradient
]


@pytest.mark.parametrize(("rule", "index"), BROADCAST_CASES)
def test_an_input_broadcast_over_the_batch_gets_the_plain_gradient(rule, index):
    """A batch-1 input that requires grad meets a batch of 4 set by an earlier layer: the rule
    sees it expanded over the batch, and its gradient (summed back) and every parameter's are
    those of a plain backward."""
    torch.manual_seed(index)
    label, model, inputs = rule.contract_cases()[index]
    single = inputs[0][:1].clone().requires_grad_()
    out_shape = model(single).shape[1:]
    setter = torch.nn.Linear(3, int(torch.Size(out_shape).numel())).double()
    both = torch.nn.ModuleDict({"setter": setter, "model": model})
    z = torch.randn(4, 3, dtype=torch.float64)

    def loss():
        out = setter(z).view(4, *out_shape) + model(single)
        return torch.sin(out).sum()

    loss().backward()
    want = {name: p.grad.clone() for name, p in both.named_parameters()}
    want_input = single.grad.clone()
    both.zero_grad(set_to_none=True)
    single.grad = None
    with GradStats(both, loss_reduction="sum"):
        loss().backward()
    torch.testing.assert_close(single.grad, want_input, rtol=1e-9, atol=1e-12, msg=label)
    for name, p in both.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=label)
