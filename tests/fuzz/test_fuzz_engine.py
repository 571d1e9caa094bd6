"""Property-based fuzzing of GradStats: random small models and losses against the reference loop.

Strategies (hypothesis, derandomized, 25-40 examples each, float64 so the budget is rounding
only, 1e-9; see tests/README.md):

* **sequence models** ``(B, T, d)``: an optional embedding front (tokens, plus a ``(1, T)``
  position table or a bare added ``pos`` parameter), then 1-4 random blocks from Linear (with or
  without bias), LayerNorm, an elementwise scale ``weight * x``, tanh, and a Linear applied twice
  (a shared weight); a nonlinear per-example head loss;
* **image models** ``(B, C, H, W)``: 1-3 random blocks from Conv2d (random kernel, stride,
  padding incl. "same", dilation, groups incl. depthwise), GroupNorm, BatchNorm in eval mode,
  layer scale ``gamma * x`` and ReLU, then a flattening Linear head;
* both loss reductions, elementwise squares on or off;
* **bad arguments**: random values for every GradStats keyword and random non-module models,
  which must raise gradnoise's own errors (``GradNoiseError``) and never anything else.

Asserted: every trainable parameter measured (no fallback), per-example squared norms, summed and
elementwise moments and ``.grad`` equal to the per-example autograd loop within 1e-9.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gradnoise import GradNoiseError, GradStats
from gradnoise.testing.check import reference_errors
from tests.fuzz import fuzz_settings

SETTINGS = fuzz_settings(30)


class Scale(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(*shape, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return self.weight * x


class Twice(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.shared = nn.Linear(dim, dim)

    def forward(self, x):
        return self.shared(torch.tanh(self.shared(x)))


class TokenFront(nn.Module):
    def __init__(self, vocab, dim, seq, kind):
        super().__init__()
        self.tokens, self.kind = nn.Embedding(vocab, dim), kind
        if kind == "table":
            self.positions = nn.Embedding(seq, dim)
        else:
            self.pos = nn.Parameter(torch.randn(1, seq, dim))

    def forward(self, ids):
        x = self.tokens(ids)
        if self.kind == "table":
            return x + self.positions(torch.arange(ids.shape[1]).unsqueeze(0))
        return x + self.pos


class ImageHead(nn.Module):
    def __init__(self, body, features):
        super().__init__()
        self.body, self.head = body, nn.LazyLinear(3)
        self.features = features

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def _sequence_block(kind, dim):
    return {
        "linear": lambda: nn.Linear(dim, dim),
        "linear-nobias": lambda: nn.Linear(dim, dim, bias=False),
        "layernorm": lambda: nn.LayerNorm(dim),
        "scale": lambda: Scale((dim,)),
        "tanh": nn.Tanh,
        "twice": lambda: Twice(dim),
    }[kind]()


@st.composite
def sequence_models(draw):
    # dim >= 2: a LayerNorm over one feature has x_hat = 0, a zero true gradient (rounding only)
    batch, seq, dim = draw(st.integers(2, 4)), draw(st.integers(1, 4)), draw(st.integers(2, 5))
    kinds = st.sampled_from(["linear", "linear-nobias", "layernorm", "scale", "tanh", "twice"])
    blocks = [_sequence_block(k, dim) for k in draw(st.lists(kinds, min_size=1, max_size=4))]
    front = draw(st.sampled_from(["none", "table", "param"]))
    if front == "none":
        inputs = torch.randn(batch, seq, dim, dtype=torch.float64)
    else:
        blocks.insert(0, TokenFront(7, dim, seq, front))
        inputs = torch.randint(0, 7, (batch, seq))
    return nn.Sequential(*blocks, nn.Linear(dim, 2)).double(), inputs


@st.composite
def image_models(draw):
    batch, channels, size = draw(st.integers(2, 3)), draw(st.sampled_from([2, 4])), 5
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "depthwise", "groupnorm", "bn-eval", "scale", "relu"]))
        if kind in ("conv", "depthwise"):
            kernel = draw(st.integers(1, 3))
            padding = draw(st.sampled_from([0, 1, "same"]))
            stride = 1 if padding == "same" else draw(st.integers(1, 2))
            blocks.append(
                nn.Conv2d(
                    channels,
                    channels,
                    kernel,
                    stride=stride,
                    padding=padding,
                    dilation=draw(st.integers(1, 2)) if padding == "same" else 1,
                    groups=channels if kind == "depthwise" else draw(st.sampled_from([1, 2])),
                    bias=draw(st.booleans()),
                )
            )
        elif kind == "groupnorm":
            blocks.append(nn.GroupNorm(2, channels))
        elif kind == "bn-eval":
            norm = nn.BatchNorm2d(channels)
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2)
            blocks.append(norm.eval())
        elif kind == "scale":
            blocks.append(Scale((channels, 1, 1)))
        else:
            blocks.append(nn.ReLU())
    inputs = torch.randn(batch, channels, size, size, dtype=torch.float64)
    model = ImageHead(nn.Sequential(*blocks), None).double()
    model(inputs)  # materialize the lazy head
    return model, inputs


def _loss(model, x, y):
    out = model(x)
    return (torch.sin(out.flatten(1)) * y.flatten(1)).sum(1).mean()


def _check(model, inputs, reduction, elementwise):
    torch.manual_seed(0)
    y = torch.randn_like(model(inputs).detach())
    errors = reference_errors(
        model, _loss, (inputs, y), loss_reduction=reduction, elementwise=elementwise
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(errors) == sorted(trainable)
    worst = max(e for per in errors.values() for e in per.values())
    assert worst < 1e-9, errors
    with GradStats(model) as stats:
        _loss(model, inputs, y).backward()
    assert not [m for m in stats.coverage().values() if m.startswith("fallback")]


@SETTINGS
@given(sequence_models(), st.sampled_from(["mean", "sum"]), st.booleans())
def test_random_sequence_models_match_the_reference(case, reduction, elementwise):
    _check(*case, reduction, elementwise)


@SETTINGS
@given(image_models(), st.sampled_from(["mean", "sum"]), st.booleans())
def test_random_image_models_match_the_reference(case, reduction, elementwise):
    _check(*case, reduction, elementwise)


anything = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers()),
)


@fuzz_settings(40)
@given(
    keyword=st.sampled_from(["loss_reduction", "fallback"]),
    value=anything,
    model=st.one_of(st.just(None), anything),
)
def test_bad_arguments_raise_only_gradnoise_errors(keyword, value, model):
    if value in ("mean", "sum", "weighted", "vmap", "error"):
        value = value + "?"
    with pytest.raises(GradNoiseError):
        GradStats(nn.Linear(2, 2), **{keyword: value})
    with pytest.raises(GradNoiseError):
        GradStats(model)


@fuzz_settings(25)
@given(shape=st.lists(st.integers(0, 3), min_size=0, max_size=3))
def test_inputs_of_any_shape_give_results_or_gradnoise_errors(shape):
    model = nn.Linear(3, 2).double()
    x = torch.randn(*shape, 3, dtype=torch.float64)
    try:
        with GradStats(model) as stats:
            F.mse_loss(model(x), torch.zeros(*shape, 2, dtype=torch.float64)).backward()
        norms = stats.per_example_sq_norms()
    except GradNoiseError:
        # refused exactly when there is no batch: a 1-d input or an empty dim 0
        assert not shape or shape[0] == 0 or 0 in shape
        return
    finally:
        model.zero_grad(set_to_none=True)
    assert shape and shape[0] > 0
    assert norms["weight"].shape == (shape[0],)
