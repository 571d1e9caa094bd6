"""Parameters used more than once: the cross terms between factored uses (layers/factors.py)
against the per-example loop, and the cases that still materialize.

Budget: float64, 1e-9 relative (rounding only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradnoise.stats.accumulate as accumulate
from gradnoise import GradStats
from gradnoise.errors import GradNoiseError
from gradnoise.testing.check import reference_errors
from gradnoise.testing.models import lm_loss, make_gpt


class TiedEmbeddingHead(nn.Module):
    """An embedding (with padding_idx) whose table is also the output layer: dense x one-hot."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.mix(self.embed(tokens))), self.embed.weight)


class EmbeddingTwice(nn.Module):
    """One table looked up at two index sets: one-hot x one-hot."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.embed(tokens) * self.embed(tokens.flip(1)))


class LinearThrice(nn.Module):
    """One linear layer applied three times: three dense uses, three cross pairs."""

    def __init__(self, dim=4):
        super().__init__()
        self.layer = nn.Linear(dim, dim)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


class LinearAndMatmul(nn.Module):
    """One use by a rule, one by ``x @ W.T`` (no rule): the fallback's use materializes."""

    def __init__(self, dim=4):
        super().__init__()
        self.layer = nn.Linear(dim, dim)

    def forward(self, x):
        return self.layer(x) + torch.tanh(x) @ self.layer.weight.T


def _lm_case(model_cls):
    def build():
        torch.manual_seed(0)
        model = model_cls().double()
        vocab = model.embed.num_embeddings
        tokens = torch.randint(0, vocab, (4, 6))
        targets = torch.randint(0, vocab, (4, 6))
        return model, (tokens, targets), _token_loss

    return build


def _token_loss(model, tokens, targets):
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / len(tokens)


def _regression_case(model_cls):
    def build():
        torch.manual_seed(0)
        model = model_cls().double()
        x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 3, 4, dtype=torch.float64)
        return model, (x, y), lambda m, a, b: F.mse_loss(m(a), b)

    return build


def _gpt_tied():
    torch.manual_seed(0)
    model, batch, loss_fn = make_gpt(3, vocab=40, dim=16, context=6, tie=True)
    return model.double(), batch, loss_fn


CASES = {
    "gpt, tied embedding and head": (_gpt_tied, True),
    "embedding with padding tied to the head": (_lm_case(TiedEmbeddingHead), True),
    "embedding looked up twice": (_lm_case(EmbeddingTwice), True),
    "linear used three times": (_regression_case(LinearThrice), True),
    "linear and a matmul without a rule": (_regression_case(LinearAndMatmul), False),
}


@pytest.fixture
def cross_calls(monkeypatch):
    """Counts the cross terms computed (proves which path ran)."""
    calls = []
    original = accumulate.cross_inner

    def counted(u, v):
        calls.append(1)
        return original(u, v)

    monkeypatch.setattr(accumulate, "cross_inner", counted)
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shared_parameters_match_the_reference(case, reduction, cross_calls):
    build, factored = CASES[case]
    model, batch, loss_fn = build()
    errors = reference_errors(model, loss_fn, batch, loss_reduction=reduction)
    assert len(errors) == len(list(model.parameters()))
    worst = max(e for per_param in errors.values() for e in per_param.values())
    assert worst < 1e-9, errors
    assert bool(cross_calls) == factored


def test_three_uses_make_three_cross_pairs(cross_calls):
    model, (x, y), loss_fn = _regression_case(LinearThrice)()
    with GradStats(model) as stats:
        loss_fn(model, x, y).backward()
    stats.per_example_sq_norms()
    assert len(cross_calls) == 1 + 2  # the second use against the first, the third against both
    assert stats.coverage()["layer.weight"].endswith("(shared by 3 uses)")


def test_elementwise_requests_still_materialize(cross_calls):
    model, batch, loss_fn = _lm_case(TiedEmbeddingHead)()
    errors = reference_errors(model, loss_fn, batch, elementwise=True)
    assert max(e for per_param in errors.values() for e in per_param.values()) < 1e-9
    assert not cross_calls


def test_cancelling_uses_in_float32_are_flagged_not_returned():
    """Two uses whose per-example gradients cancel exactly: the sum of the self and cross
    terms is pure rounding, and the bound says so."""

    class Cancelling(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.layer(x)) - torch.tanh(self.layer(x)) + x)

    torch.manual_seed(0)
    model = Cancelling()
    x = torch.randn(6, 3, 4)
    with GradStats(model) as stats:
        model(x).pow(2).mean().backward()
    with pytest.raises(GradNoiseError, match="expected per-example norms whose float32 rounding"):
        stats.per_example_sq_norms()


def test_tied_lm_keeps_no_factors_after_backward():
    """The factors (activations, output gradients) are released once every use is in."""
    torch.manual_seed(0)
    model, batch, _ = make_gpt(2, vocab=30, dim=8, context=5, tie=True)
    with GradStats(model) as stats:
        lm_loss(model, *batch).backward()
    acc = stats._recorder.acc["tok.weight"]
    assert acc._factors is None
    assert torch.isfinite(stats.per_example_sq_norms()["tok.weight"]).all()
