"""Each conv method (grouped, bmm, gram, product) against materialized per-example gradients.

The rule is driven directly with the method forced (``conv.choose_method`` monkeypatched) on
random strides, paddings, dilations and groups, then the whole engine against the per-example
autograd loop. All in float64: budget 1e-9 relative.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradnoise.layers import conv
from gradnoise.layers.registry import Request, settled
from gradnoise.testing.check import reference_errors

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# gram in both of its ways to U^T U: from the unfolded input, from the padded input's Gram
METHODS = ["grouped", "bmm", "gram:unfold", "gram:padded", "product"]
RULES = {1: conv.ConvRule(1), 2: conv.ConvRule(2)}
FUNCTIONS = {1: F.conv1d, 2: F.conv2d}
COST_MODEL = conv.choose_method


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _serves(method: str, positions: int, request: Request) -> bool:
    if method == "product":
        return positions == 1 and not request.materialize
    if method == "gram":
        return not (request.elementwise or request.materialize)
    return True


def _force(monkeypatch, forced_method: str) -> list[str]:
    """Route every call to the method where it can serve the request, else to the cost model.

    ``forced_method`` is a method, or ``gram:<input>`` to force gram's way to U^T U as well.
    Returns the list of the methods chosen, call by call.
    """
    method, _, gram_input = forced_method.partition(":")
    chosen = []

    def forced(sizes, request):
        serves = _serves(method, sizes.positions, request)
        chosen.append(method if serves else COST_MODEL(sizes, request))
        return chosen[-1]

    monkeypatch.setattr(conv, "choose_method", forced)
    if gram_input:
        monkeypatch.setattr(conv, "choose_gram_input", lambda sizes: gram_input)
    return chosen


def _per_example(dims, x, weight, bias, grad_output, options):
    """Per-example (weight, bias) gradients by autograd, one example at a time."""
    weight = weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    grads = []
    for xi, gi in zip(x, grad_output, strict=True):
        out = FUNCTIONS[dims](xi[None], weight, bias, **options)
        params = [weight] if bias is None else [weight, bias]
        grads.append(torch.autograd.grad((out * gi[None]).sum(), params))
    return [torch.stack(g) for g in zip(*grads, strict=True)]


@st.composite
def conv_calls(draw, method):
    """``(dims, x, weight, bias, options)`` of one convolution; one output position for product."""
    dims = draw(st.sampled_from([1, 2]))
    axis = st.integers(1, 3)
    kernel = tuple(draw(axis) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    paddings = ["same", "valid", 0] if method == "product" else ["same", "valid", 0, 1, "tuple"]
    padding = draw(st.sampled_from(paddings))
    if padding == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    if padding == "same":
        stride = (1,) * dims  # PyTorch allows 'same' only with stride 1
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    if method == "product":  # inputs just large enough for one output position
        size = [1] * dims if padding == "same" else span
    else:
        pads = (0,) * dims if isinstance(padding, str) else _per_axis(padding, dims)
        size = [
            max(s - 2 * p, 1) + draw(st.integers(0, 4)) for s, p in zip(span, pads, strict=True)
        ]
    groups = draw(st.sampled_from(["one", "two", "depthwise"]))
    c_in = {"one": draw(st.integers(1, 3)), "two": 4, "depthwise": 3}[groups]
    groups = {"one": 1, "two": 2, "depthwise": c_in}[groups]
    c_out = groups * draw(st.integers(1, 2))
    batch = draw(st.integers(1, 4))
    x = torch.randn(batch, c_in, *size, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, *kernel, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64) if draw(st.booleans()) else None
    options = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return dims, x, weight, bias, options


def _per_axis(value, dims):
    return value if isinstance(value, tuple) else (value,) * dims


def _check_rule(method, call, request, monkeypatch):
    dims, x, weight, bias, options = call
    rule = RULES[dims]
    bound = rule.bind(x, weight, bias, **options)
    grad_output = torch.randn_like(FUNCTIONS[dims](x, weight, bias, **options))
    roles = ("weight",) if bias is None else ("weight", "bias")
    _force(monkeypatch, method)
    pieces = rule.backward(bound, grad_output, roles, request)
    assert pieces["weight"].method == method.partition(":")[0]
    wanted = _per_example(dims, x, weight, bias, grad_output, options)
    for role, want in zip(roles, wanted, strict=True):
        _assert_pieces(pieces[role], want, request)


def _assert_pieces(pieces, want, request):
    pieces = settled(pieces, request)  # small per-example gradients are handed over whole
    assert _relative(pieces.grad, want.sum(0)) < 1e-9
    if request.materialize:
        assert _relative(pieces.per_example, want) < 1e-9
        return
    assert _relative(pieces.sq_norms, want.flatten(1).pow(2).sum(1)) < 1e-9
    if request.elementwise:
        assert _relative(pieces.elem_sq, want.pow(2).sum(0)) < 1e-9
    else:
        assert pieces.elem_sq is None


REQUESTS = {
    "grouped": [Request(), Request(elementwise=True), Request(materialize=True)],
    "bmm": [Request(), Request(elementwise=True), Request(materialize=True)],
    "gram:unfold": [Request()],
    "gram:padded": [Request()],
    "product": [Request(), Request(elementwise=True)],
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_per_example_gradients(method, monkeypatch):
    @SETTINGS
    @given(call=conv_calls(method), request=st.sampled_from(REQUESTS[method]))
    def check(call, request):
        _check_rule(method, call, request, monkeypatch)

    check()


def test_bmm_chunks_large_batches(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(conv, "BMM_CHUNK_BYTES", 4 * 2 * 3 * 3 * 8)  # one example per chunk
    x, weight = torch.randn(5, 4, 6, 6).double(), torch.randn(4, 2, 3, 3).double()
    call = (2, x, weight, None, {"stride": 1, "padding": 1, "dilation": 1, "groups": 2})
    _check_rule("bmm", call, Request(elementwise=True), monkeypatch)


class _Net(nn.Module):
    """conv -> tanh -> grouped strided conv -> depthwise conv -> conv to one position."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        make = nn.Conv1d if dims == 1 else nn.Conv2d
        self.stem = make(3, 4, 3, padding="same", dilation=2)
        self.grouped = make(4, 6, 2, stride=2, padding=1, groups=2, bias=False)
        self.depthwise = make(6, 6, 3, padding=1, groups=6)
        self.head = make(6, 2, 4)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(torch.tanh(self.depthwise(torch.tanh(self.grouped(h)))))


def _head_loss(model, x, y):
    """Mean over examples of a nonlinear scalar per example, so per-example grads differ."""
    return (torch.sin(model(x).flatten(1)) * y.flatten(1)).sum(1).mean()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("elementwise", [False, True])
def test_engine_matches_reference_with_each_method(method, dims, elementwise, monkeypatch):
    chosen = _force(monkeypatch, method)
    torch.manual_seed(dims)
    model = _Net(dims).double()
    x = torch.randn(3, 3, *(6,) * dims, dtype=torch.float64)
    y = torch.randn_like(model(x).detach())
    errors = reference_errors(model, _head_loss, (x, y), elementwise=elementwise)
    assert len(errors) == 7
    worst = max(e for per in errors.values() for e in per.values())
    assert worst < 1e-9, errors
    method = method.partition(":")[0]
    assert method in chosen or (method == "gram" and elementwise)


def _sizes(batch, c_in, c_out, side, groups=1):
    """A 3x3 convolution with padding 1 on a side x side map."""
    return conv.ConvSizes(
        batch, groups, c_in // groups, 9, c_out // groups, side * side, (side + 2) ** 2
    )


def test_cost_model_picks_gram_for_late_stages_and_grouped_for_early_ones():
    plain, elementwise, materialize = (
        Request(),
        Request(elementwise=True),
        Request(materialize=True),
    )
    for batch in (8, 32):
        late, last = _sizes(batch, 512, 512, 2), _sizes(batch, 512, 512, 1)
        assert conv.choose_method(late, plain) == "gram"
        assert conv.choose_gram_input(late) == "padded"
        assert conv.choose_method(late, elementwise) == "bmm"
        assert conv.choose_method(last, elementwise) == "product"
        assert conv.choose_method(last, materialize) == "bmm"
        for request in (plain, elementwise):
            assert conv.choose_method(_sizes(batch, 3, 64, 32), request) == "grouped"
            assert conv.choose_method(_sizes(batch, 64, 64, 32), request) == "grouped"
    # depthwise: no channels to contract, so U^T U is cheaper from the unfolded input
    assert conv.choose_gram_input(_sizes(32, 512, 512, 4, groups=512)) == "unfold"


@pytest.mark.parametrize(
    ("dims", "size", "kernel", "options"),
    [
        (2, (5, 6), 1, {}),
        (2, (5, 6), 1, {"stride": 2}),
        (2, (5, 6), 1, {"stride": (2, 3), "groups": 2}),
        (2, (4, 5), 3, {"stride": 2}),
        (2, (3, 3), 3, {}),
        (2, (4, 3), 3, {"stride": 2, "groups": 2}),
        (1, (7,), 1, {"stride": 3}),
        (1, (4,), 3, {"stride": 2}),
    ],
)
def test_columns_read_from_the_input_equal_unfold(dims, size, kernel, options):
    """1x1 kernels and single output positions take their columns from the input itself."""
    rule = RULES[dims]
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    weight = torch.randn(6, 4 // options.get("groups", 1), *(kernel,) * dims, dtype=torch.float64)
    bound = rule.bind(x, weight, None, **options)
    out_shape = FUNCTIONS[dims](x, weight, None, **options).shape[2:]
    groups, stride = options.get("groups", 1), options.get("stride", 1)
    image = x if dims == 2 else x.unsqueeze(2)
    unfold_kernel = (kernel,) * 2 if dims == 2 else (1, kernel)
    unfold_stride = stride if dims == 2 else (1, stride)
    want = F.unfold(image, unfold_kernel, stride=unfold_stride)
    want = want.reshape(3, groups, -1, want.shape[-1])
    torch.testing.assert_close(rule._unfold(bound, out_shape), want, rtol=0, atol=0)
