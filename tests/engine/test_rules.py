"""Every layer rule against the per-example autograd loop, on random shapes (hypothesis).

All in float64, so the only differences are rounding: budget 1e-9 relative.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradnoise import GradStats
from gradnoise.layers import linear, registry
from gradnoise.layers.registry import Request, settled
from gradnoise.testing.check import reference_errors

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _head_loss(model, x, y):
    """Mean over examples of a nonlinear scalar per example, so per-example grads differ."""
    out = model(x)
    return (torch.sin(out.flatten(1)) * y.flatten(1)).sum(1).mean()


def _assert_matches(model, x, reduction="mean", elementwise=True):
    torch.manual_seed(0)
    y = torch.randn_like(model(x).detach())
    errors = reference_errors(
        model, _head_loss, (x, y), loss_reduction=reduction, elementwise=elementwise
    )
    assert len(errors) == len([p for p in model.parameters() if p.requires_grad])
    worst = max(e for per in errors.values() for e in per.values())
    assert worst < 1e-9, errors


reductions = st.sampled_from(["mean", "sum"])


@SETTINGS
@given(
    batch=st.integers(2, 5),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    bias=st.booleans(),
    reduction=reductions,
    elementwise=st.booleans(),
)
def test_linear_any_leading_dims(batch, lead, d_in, d_out, bias, reduction, elementwise):
    torch.manual_seed(batch)
    model = nn.Linear(d_in, d_out, bias=bias).double()
    x = torch.randn(batch, *lead, d_in, dtype=torch.float64)
    _assert_matches(model, x, reduction, elementwise)


@pytest.mark.parametrize("method", ["product", "gram", "bmm"])
@pytest.mark.parametrize("elementwise", [False, True])
def test_each_linear_method_matches_materialized_gradients(method, elementwise):
    torch.manual_seed(0)
    seq = 1 if method == "product" else 5
    acts = torch.randn(4, seq, 3, dtype=torch.float64)
    grads = torch.randn(4, seq, 2, dtype=torch.float64)
    per_example = torch.einsum("bto,bti->boi", grads, acts)
    request = Request(elementwise=elementwise)
    if method == "product":
        pieces = linear._product(acts[:, 0], grads[:, 0], request)
    elif method == "gram":
        pieces = linear._gram(acts, grads)
    else:
        pieces = linear._bmm(acts, grads, request)
    pieces = settled(pieces, request)  # small per-example gradients are handed over whole
    torch.testing.assert_close(pieces.grad, per_example.sum(0))
    torch.testing.assert_close(pieces.sq_norms, per_example.pow(2).sum((1, 2)))
    if elementwise and method != "gram":
        torch.testing.assert_close(pieces.elem_sq, per_example.pow(2).sum(0))
    assert pieces.method == method


def test_bmm_chunks_large_batches(monkeypatch):
    monkeypatch.setattr(linear, "BMM_CHUNK_BYTES", 3 * 2 * 8)  # one example per chunk
    torch.manual_seed(0)
    acts, grads = torch.randn(5, 4, 3).double(), torch.randn(5, 4, 2).double()
    per_example = torch.einsum("bto,bti->boi", grads, acts)
    pieces = linear._bmm(acts, grads, Request(elementwise=True))
    torch.testing.assert_close(pieces.sq_norms, per_example.pow(2).sum((1, 2)))
    torch.testing.assert_close(pieces.elem_sq, per_example.pow(2).sum(0))


def test_bmm_pieces_do_not_alias_the_reused_scratch_buffer():
    """Per-example gradients go through one buffer kept between calls: a second call (same
    shapes, new values) must leave the first call's pieces as they were."""
    torch.manual_seed(0)
    shapes = [(5, 4, 3), (5, 4, 2)]
    first_inputs = [torch.randn(*shape) for shape in shapes]
    first = linear._bmm(*first_inputs, Request(elementwise=True))
    kept = [first.grad.clone(), first.sq_norms.clone(), first.elem_sq.clone()]
    second = linear._bmm(*(torch.randn(*shape) for shape in shapes), Request(elementwise=True))
    assert not torch.equal(second.sq_norms, kept[1])
    for now, then in zip((first.grad, first.sq_norms, first.elem_sq), kept, strict=True):
        torch.testing.assert_close(now, then, rtol=0, atol=0)
    per_example = torch.einsum("bto,bti->boi", first_inputs[1], first_inputs[0])
    torch.testing.assert_close(first.sq_norms, per_example.pow(2).sum((1, 2)))


def test_scratch_reuses_one_cpu_buffer_and_never_keeps_large_ones():
    like = torch.empty(0)
    a = registry.scratch(100, like)
    b = registry.scratch(50, like)
    assert b.data_ptr() == a.data_ptr()  # the same memory, reused
    large = registry.SCRATCH_KEEP_BYTES // like.element_size() + 1
    first, second = registry.scratch(large, like), registry.scratch(large, like)  # both alive
    assert first.data_ptr() != second.data_ptr()


def test_cost_model_prefers_gram_for_short_sequences_and_bmm_for_long_ones():
    plain = Request()
    assert linear.choose_method(16, 1, 256, 256, plain) == "product"
    assert linear.choose_method(16, 4, 256, 256, plain) == "gram"
    assert linear.choose_method(16, 512, 256, 256, plain) == "bmm"
    assert linear.choose_method(16, 4, 256, 256, Request(elementwise=True)) == "bmm"
    assert linear.choose_method(16, 4, 256, 256, Request(materialize=True)) == "bmm"


@SETTINGS
@given(
    batch=st.integers(2, 4),
    dims=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same", "valid"]),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    reduction=reductions,
)
def test_conv(batch, dims, groups, kernel, stride, padding, dilation, bias, reduction):
    if padding == "same":
        stride = 1  # PyTorch allows 'same' only with stride 1
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    torch.manual_seed(kernel)
    model = conv(2, 4, kernel, stride, padding, dilation, groups=groups, bias=bias).double()
    size = (7,) * dims
    x = torch.randn(batch, 2, *size, dtype=torch.float64)
    _assert_matches(model, x, reduction)


@SETTINGS
@given(
    batch=st.integers(2, 4),
    length=st.integers(1, 6),
    vocab=st.integers(2, 9),
    padding=st.booleans(),
    reduction=reductions,
    elementwise=st.booleans(),
)
def test_embedding(batch, length, vocab, padding, reduction, elementwise):
    torch.manual_seed(vocab)
    model = nn.Embedding(vocab, 3, padding_idx=0 if padding else None).double()
    x = torch.randint(0, vocab, (batch, length))
    _assert_matches(model, x, reduction, elementwise)


NORMS = {
    "layer": lambda: nn.LayerNorm(6),
    "layer-2d": lambda: nn.LayerNorm((3, 6)),
    "layer-no-bias": lambda: nn.LayerNorm(6, bias=False),
    "rms": lambda: nn.RMSNorm(6),
    "group": lambda: nn.GroupNorm(2, 6),
}


@pytest.mark.parametrize("kind", sorted(NORMS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_norms(kind, reduction):
    torch.manual_seed(0)
    model = NORMS[kind]().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    if kind == "group":
        x = torch.randn(4, 6, 5, dtype=torch.float64)
    _assert_matches(model, x, reduction)


def test_functional_weight_passed_to_f_linear_is_measured():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(torch.tanh(self.proj(x)), self.proj.weight)  # tied, functional

    model = Functional().double()
    _assert_matches(model, torch.randn(4, 2, 3, dtype=torch.float64))


class _FirstOutput(nn.Module):
    """Wraps a module and keeps its first output (RNNs return (output, hidden))."""

    def __init__(self, module, two_inputs=False):
        super().__init__()
        self.module, self.two_inputs = module, two_inputs

    def forward(self, x):
        out = self.module(x, x) if self.two_inputs else self.module(x)
        return out[0] if isinstance(out, tuple) else out


FALLBACK_MODULES = {
    "lstm": (lambda: nn.LSTM(3, 4, batch_first=True), (4, 5, 3), "fallback-loop"),
    "gru": (lambda: nn.GRU(3, 4, batch_first=True), (4, 5, 3), "fallback-loop"),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (3, 2, 3, 3, 3), "fallback"),
    "conv-transpose": (lambda: nn.ConvTranspose2d(2, 3, 2), (3, 2, 3, 3), "fallback"),
    "prelu": (lambda: nn.PReLU(3), (4, 3, 5), "fallback"),
    "instance-norm": (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 5), "fallback"),
}


@pytest.mark.parametrize("kind", sorted(FALLBACK_MODULES))
def test_modules_without_a_rule_go_through_the_fallback(kind):
    make, shape, method = FALLBACK_MODULES[kind]
    torch.manual_seed(0)
    model = _FirstOutput(make()).double()
    _assert_matches(model, torch.randn(*shape, dtype=torch.float64))
    with GradStats(model) as stats:
        model(torch.randn(*shape, dtype=torch.float64)).sum().backward()
    assert set(stats.coverage().values()) == {method}


def test_bilinear_with_two_batched_inputs_goes_through_the_fallback():
    torch.manual_seed(0)
    model = _FirstOutput(nn.Bilinear(3, 3, 2), two_inputs=True).double()
    _assert_matches(model, torch.randn(4, 3, dtype=torch.float64))
