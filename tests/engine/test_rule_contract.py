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
