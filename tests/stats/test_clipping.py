"""Per-example clipping (gradnoise.stats.clipping) against an explicit per-example loop.

The reference takes every example's gradient by its own backward (gradnoise.testing.reference),
clips it to norm C and sums: sum_i min(1, C/||g_i||) g_i / B. C is the median reference norm,
so about half the examples are clipped and half are not. Budget: 1e-5 relative per parameter in
float32 (the engine's own reference budget), on W1-W3 and every real model the engine is
tested on (attention key biases left out, as there: their true gradient is exactly zero, so
both sides hold rounding noise); MobileNetV2 only in float64, where its float32 reference loop
is itself off by ~3e-5 (see tests/engine/test_real_models.py).
"""

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.stats.clipping import clip_factors, clipped_backward
from gradnoise.testing import models
from gradnoise.testing.check import relative_error
from gradnoise.testing.per_example import per_example_loss
from gradnoise.testing.reference import per_example_grads

from ..engine.test_real_models import SIZES, ZERO_GRADIENT

# key biases: their true gradient is exactly zero (softmax ignores a per-row shift)
ZERO = (*ZERO_GRADIENT, ".k.bias")

hf_models = pytest.importorskip("gradnoise.testing.hf_models")

OWN = {
    "W1": lambda g: models.make_mlp(6, generator=g),
    "W2": lambda g: models.make_cnn(4, generator=g),
    "W3": lambda g: models.make_gpt(4, vocab=50, dim=16, context=8, generator=g),
}


def _build(name):
    generator = torch.Generator().manual_seed(0)
    if name in OWN:
        return OWN[name](generator)
    if not hf_models.is_available(name):
        pytest.skip(f"{name}: {hf_models.missing_requirements(name)} not installed")
    return hf_models.HF_MODELS[name](3, generator=generator, **SIZES[name])


def _reference_clipped(model, loss_fn, batch, max_norm=None):
    grads = per_example_grads(model, loss_fn, batch)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    max_norm = float(norms.median()) if max_norm is None else max_norm
    factors = torch.clamp(max_norm / norms, max=1.0)
    size = norms.numel()
    clipped = {
        name: (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0) / size
        for name, g in grads.items()
    }
    return clipped, norms, max_norm


def _check(model, loss_fn, batch, budget):
    want, want_norms, max_norm = _reference_clipped(model, loss_fn, batch)
    model.zero_grad(set_to_none=True)
    losses = per_example_loss(loss_fn)
    out = clipped_backward(model, lambda: losses(model, *batch), max_norm)
    assert relative_error(out.norms, want_norms, 1e-12) < budget
    assert 0 < out.clipped < len(want_norms)  # both branches of min(1, C/||g_i||) are exercised
    params = dict(model.named_parameters())
    errors = {
        name: relative_error(params[name].grad, g, 1e-12)
        for name, g in want.items()
        if not name.endswith(ZERO)
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < budget, (worst, errors[worst])


FLOAT32 = ["W1", "W2", "W3", *sorted(n for n in SIZES if n != "mobilenet_bn_eval")]


@pytest.mark.parametrize("name", FLOAT32)
def test_clipped_sum_equals_the_per_example_loop_float32(name):
    model, batch, loss_fn = _build(name)
    _check(model, loss_fn, batch, 1e-5)


@pytest.mark.parametrize("name", ["W3", "mobilenet_bn_eval"])
def test_clipped_sum_equals_the_per_example_loop_float64(name):
    model, batch, loss_fn = _build(name)
    model = model.double()
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    _check(model, loss_fn, batch, 1e-9)


@pytest.mark.parametrize("name", ["W1", "W3", "gpt2"])
def test_per_example_losses_average_to_the_models_own_loss(name):
    model, batch, loss_fn = _build(name)
    with torch.no_grad():
        mean = per_example_loss(loss_fn)(model, *batch).mean()
        assert torch.allclose(mean, loss_fn(model, *batch), rtol=1e-6)


def test_sum_reduction_existing_grad_kept_and_dropout_masks_repeat():
    """reduction='sum' is B times 'mean'; .grad held before the call is added to, not replaced;
    with dropout the second pass draws the first pass's masks (or the sum would not match)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Dropout(0.5), torch.nn.Tanh(), torch.nn.Linear(16, 3)
    )
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))

    def losses():
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    torch.manual_seed(1)
    # the reference: the same masks as the first pass, drawn with the same seed
    out = clipped_backward(model, losses, 0.3, reduction="sum")
    clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    masks_loss = losses()
    grads = [
        torch.cat(
            [
                g.flatten()
                for g in torch.autograd.grad(masks_loss[i], model.parameters(), retain_graph=True)
            ]
        )
        for i in range(8)
    ]
    want = sum(min(1.0, 0.3 / float(g.norm())) * g for g in grads)
    got = torch.cat([clipped[n].flatten() for n, _ in model.named_parameters()])
    assert relative_error(got, want, 1e-12) < 1e-5
    assert out.clipped == sum(float(g.norm()) > 0.3 for g in grads)

    before = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    torch.manual_seed(1)
    clipped_backward(model, losses, 0.3, reduction="mean")
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, before[n] + clipped[n] / 8, rtol=1e-5, atol=1e-7)


def test_clip_factors_formula():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0])
    assert clip_factors(norms, 1.0).tolist() == [1.0, 1.0, 1.0, 0.25]


def _tiny():
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    return model, x


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_norm": 0.0}, "clipped_backward max_norm: expected a finite number > 0"),
        ({"max_norm": float("inf")}, "clipped_backward max_norm: expected a finite number > 0"),
        ({"max_norm": 1.0, "reduction": "none"}, "clipped_backward reduction: expected 'sum'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model, x = _tiny()
    with pytest.raises(GradNoiseError, match=message):
        clipped_backward(model, lambda: model(x).sum(1), **kwargs)


def test_scalar_loss_is_refused_and_grads_left_alone():
    model, x = _tiny()
    model.weight.grad = torch.ones_like(model.weight)
    with pytest.raises(GradNoiseError, match=r"expected loss_fn\(\) returning a \(B,\) tensor"):
        clipped_backward(model, lambda: model(x).sum(), 1.0)
    assert torch.equal(model.weight.grad, torch.ones_like(model.weight))
    assert model.bias.grad is None


def test_a_second_pass_on_another_batch_is_refused():
    model, x = _tiny()
    batches = iter([x, x[:2]])
    with pytest.raises(GradNoiseError, match=r"expected the same \(4,\) losses as the first pass"):
        clipped_backward(model, lambda: model(next(batches)).sum(1), 1.0)
