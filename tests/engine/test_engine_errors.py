"""Every error GradStats raises, and the promise that hooks never outlive the block."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise import (
    BatchCouplingError,
    GradNoiseError,
    GradStats,
    NotReadyError,
    UnsupportedModuleError,
)
from gradnoise.testing.check import reference_errors
from tests.engine.models_for_tests import Scale


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _batch(n=5):
    return torch.randn(n, 3), torch.randint(0, 2, (n,))


def _step(model, stats_kwargs=None, loss=None, batch=None):
    x, y = batch or _batch()
    with GradStats(model, **(stats_kwargs or {})) as stats:
        (loss or (lambda m: F.cross_entropy(m(x), y)))(model).backward()
    return stats


def _hooks_left(model):
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = sum(len(p._backward_hooks or {}) for p in model.parameters())
    return modules + params + torch._C._len_torch_function_stack()


def test_hooks_and_mode_are_removed_on_exit():
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 2))
    _step(model)
    assert _hooks_left(model) == 0


def test_hooks_and_mode_are_removed_when_the_block_raises():
    model = nn.Sequential(nn.Linear(3, 4), Scale(4), nn.Linear(4, 2))
    with pytest.raises(KeyError), GradStats(model):
        model(torch.randn(2, 3)).sum().backward()
        raise KeyError("user error inside the block")
    assert _hooks_left(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"loss_reduction": "avg"},
            "loss_reduction.*expected 'mean' or 'sum' or 'weighted', got 'avg'",
        ),
        ({"fallback": "skip"}, "fallback.*expected 'vmap' or 'error', got 'skip'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(GradNoiseError, match=match):
        GradStats(_mlp(), **kwargs)


def test_not_a_module():
    with pytest.raises(GradNoiseError, match=r"expected a torch.nn.Module, got list"):
        GradStats(list(_mlp().parameters()))


def test_model_without_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(GradNoiseError, match="at least one parameter that requires grad"):
        GradStats(model)


def test_results_before_backward():
    model = _mlp()
    with GradStats(model) as stats:
        model(_batch()[0])
        with pytest.raises(NotReadyError, match="no backward pass yet"):
            stats.moments()
        with pytest.raises(NotReadyError, match="no backward pass yet"):
            stats.coverage()


def test_loss_that_does_not_depend_on_the_batch():
    model = _mlp()
    with pytest.raises(GradNoiseError, match="the loss does not depend on the batch"):
        _step(model, loss=lambda m: sum(p.pow(2).sum() for p in m.parameters())).moments()


def test_regularizer_in_the_loss_is_reported():
    x, y = _batch()
    model = _mlp()

    def loss(m):
        return F.cross_entropy(m(x), y) + 0.1 * m[0].weight.pow(2).sum()

    stats = _step(model, loss=loss)
    with pytest.raises(GradNoiseError, match=r"parameter '0.weight'.*regularizer"):
        stats.per_example_sq_norms()


def test_a_use_without_a_rule_hands_the_parameter_to_the_fallback_of_its_module():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2)

        def forward(self, x):
            return self.proj(x) + x @ self.proj.weight.T  # matmul, not F.linear

    torch.manual_seed(0)
    model = Sneaky().double()
    x, y = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    errors = reference_errors(model, lambda m, x, y: F.cross_entropy(m(x), y), (x, y))
    assert max(e for per in errors.values() for e in per.values()) < 1e-9, errors
    stats = _step(model, batch=(x, y))
    # the F.linear use is left to the fallback too, which sees both uses of the weight
    assert stats.coverage() == {"proj.weight": "fallback", "proj.bias": "product"}


def test_a_use_outside_every_module_is_reported():
    model = _mlp()
    x, y = _batch()
    with GradStats(model) as stats:
        (F.cross_entropy(model(x), y) + (x @ model[0].weight.T).sum()).backward()
    with pytest.raises(GradNoiseError, match=r"'0.weight'.*x @ W.T"):
        stats.moments()


def test_backward_twice_in_one_block():
    model = _mlp()
    x, y = _batch()
    with GradStats(model):
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)
        with pytest.raises(GradNoiseError, match="a second backward pass inside the same block"):
            loss.backward()


def test_forward_after_backward_in_one_block():
    model = _mlp()
    x, y = _batch()
    with GradStats(model):
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(GradNoiseError, match="after the backward pass"):
            model(x)


def test_batch_size_one_where_a_variance_is_asked_for():
    stats = _step(_mlp(), batch=_batch(1))
    assert stats.per_example_sq_norms()["0.weight"].shape == (1,)
    with pytest.raises(GradNoiseError, match="at least 2 examples.*batch size 1"):
        stats.noise_scale()


def test_batch_norm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(BatchCouplingError, match="batch normalization in training mode.*eval"):
        GradStats(model)
    model.eval()  # running statistics: a per-channel affine map of each example
    stats = _step(model, loss=lambda m: m(torch.randn(4, 3)).pow(2).mean())
    assert stats.coverage()["1.weight"] == "direct"


def test_functional_batch_norm_with_batch_statistics_is_refused():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)

        def forward(self, x):
            return F.batch_norm(self.proj(x), None, None, training=True)

    with pytest.raises(BatchCouplingError, match=r"F.batch_norm\(training=True\)"):
        _step(Functional(), loss=lambda m: m(torch.randn(4, 3)).pow(2).mean())


def test_sequence_first_attention_is_refused():
    with pytest.raises(GradNoiseError, match="batch_first=False.*batch_first=True"):
        GradStats(nn.MultiheadAttention(4, 2))


def test_fallback_error_policy_names_the_use_without_a_rule():
    model = nn.Sequential(nn.Linear(3, 4), Scale(4))
    with pytest.raises(
        UnsupportedModuleError, match=r"TensorBase.pow on '1.gain'.*fallback='vmap'"
    ):
        _step(model, {"fallback": "error"}, loss=lambda m: m(torch.randn(4, 3)).sum())
    assert _hooks_left(model) == 0


def test_inconsistent_batch_dimension():
    class Flattens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(self.a(x).flatten(0, 1))  # (B*T, 3): examples no longer on dim 0

    with pytest.raises(GradNoiseError, match="examples on dim 0.*batch size 4.*size 8"):
        _step(Flattens(), loss=lambda m: m(torch.randn(4, 2, 3)).sum())


def test_embedding_options_that_cannot_be_measured():
    for kwargs, error, match in [
        ({"scale_grad_by_freq": True}, BatchCouplingError, "scale_grad_by_freq=True"),
        ({"sparse": True}, GradNoiseError, "sparse=True"),
    ]:
        model = nn.Embedding(5, 2, **kwargs)
        with pytest.raises(error, match=match):
            _step(model, loss=lambda m: m(torch.tensor([[1, 2], [3, 1]])).sum())


def test_random_fallback_module_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return F.dropout(x * self.gain.pow(2), 0.5, training=True)  # pow: the fallback

    with pytest.raises(GradNoiseError, match="random operations.*dropout"):
        _step(Noisy(), loss=lambda m: m(torch.randn(4, 3)).sum())


def test_fallback_module_without_tensor_arguments():
    class NoTensors(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.ones(2, 3))

        def forward(self, n):
            return self.table[:n]

    with pytest.raises(GradNoiseError, match="at least one tensor argument"):
        _step(NoTensors(), loss=lambda m: m(2).sum())


def test_nested_enter_is_refused():
    stats = GradStats(_mlp())
    with stats, pytest.raises(GradNoiseError, match="already open"):
        stats.__enter__()


def test_frozen_and_unused_parameters_are_listed_in_coverage():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    stats = _step(model, loss=lambda m: m[1](m[0](torch.randn(3, 3))).sum())
    coverage = stats.coverage()
    assert coverage["0.weight"] == "skipped: frozen (requires_grad=False)"
    assert coverage["2.bias"].startswith("skipped: no gradient")
    assert coverage["1.weight"] == "product"
    assert set(stats.moments()) == {"1.weight", "1.bias"}


def test_no_grad_forward_inside_the_block_is_ignored():
    model = _mlp()
    x, y = _batch()
    with GradStats(model) as stats:
        with torch.no_grad():
            model(torch.randn(7, 3))  # another batch size, but not recorded
        F.cross_entropy(model(x), y).backward()
    assert stats.batch_size == 5


def test_one_gradstats_object_serves_many_steps():
    model = _mlp()
    stats = GradStats(model)
    results = []
    for seed in range(2):
        torch.manual_seed(seed)
        x, y = _batch(4 + seed)
        with stats:
            F.cross_entropy(model(x), y).backward()
        results.append(stats.per_example_sq_norms()["0.weight"])
        model.zero_grad(set_to_none=True)
    assert [r.shape for r in results] == [(4,), (5,)]
    assert _hooks_left(model) == 0


def test_results_of_a_gradstats_that_was_never_entered():
    with pytest.raises(NotReadyError, match="a GradStats that was never entered"):
        GradStats(_mlp()).per_example_sq_norms()


def test_statistics_are_a_snapshot_unaffected_by_later_changes_of_grad():
    model = _mlp()
    x, y = _batch(8)
    with GradStats(model) as stats:
        F.cross_entropy(model(x), y).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # in place, after the block
    model.zero_grad(set_to_none=False)
    moments = stats.moments()
    for name, grad in plain.items():
        torch.testing.assert_close(moments[name].grad_sum, grad * 8)


def test_an_in_place_change_of_a_layer_input_before_backward_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            out = self.b(h)
            h += 1.0  # changes b's input after b used it
            return out + h.sum(1, keepdim=True)

    with pytest.raises(
        GradNoiseError, match=r"linear of 'b.weight'.*in-place change of its 'input'"
    ):
        _step(InPlace(), loss=lambda m: m(torch.randn(4, 3)).pow(2).mean())


def test_an_in_place_change_of_an_added_input_is_harmless_and_allowed():
    class AddThenChange(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 3))
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = x * 1.0
            y = h + self.pos
            h.mul_(2.0)  # the add's backward never reads h
            return self.head(y)

    stats = _step(AddThenChange(), loss=lambda m: m(torch.randn(4, 3)).pow(2).mean())
    assert stats.coverage()["pos"] == "direct"


def test_nested_blocks_of_two_gradstats_are_refused():
    model = _mlp()
    with (
        GradStats(model),
        pytest.raises(GradNoiseError, match="one open GradStats block at a time"),
    ):
        GradStats(model).__enter__()
    assert _hooks_left(model) == 0


def test_an_empty_batch_is_refused():
    with pytest.raises(GradNoiseError, match="an empty batch"):
        _step(_mlp(), batch=(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)))


def test_parameters_frozen_swapped_or_unfrozen_after_build_are_seen_at_the_next_block():
    model = _mlp()
    stats = GradStats(model)
    x, y = _batch()
    model[0].weight.requires_grad_(False)  # frozen after build
    with stats:
        F.cross_entropy(model(x), y).backward()
    assert stats.coverage()["0.weight"] == "skipped: frozen (requires_grad=False)"
    model[0].weight.requires_grad_(True)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model.zero_grad(set_to_none=True)
    with stats:
        F.cross_entropy(model(x), y).backward()
    assert stats.coverage()["0.weight"] == "product"
    assert stats.per_example_sq_norms()["0.weight"].shape == (5,)
    assert _hooks_left(model) == 0


def test_a_non_finite_gradient_of_a_shared_parameter_is_reported_as_such():
    model = nn.Linear(3, 3)
    x = torch.randn(4, 3)
    with GradStats(model) as stats:
        (model(model(x)).sum() * float("nan")).backward()
    with pytest.raises(GradNoiseError, match="NaN or inf"):
        stats.moments()


def test_float32_gram_norms_of_cancelling_positions_are_refused_and_bmm_is_exact():
    torch.manual_seed(0)
    model = nn.Linear(64, 64, bias=False)
    a = torch.randn(4, 1, 64).expand(4, 8, 64).contiguous()  # the same input at every position
    signs = torch.tensor([1.0, -1.0] * 4).view(1, 8, 1)
    g = torch.randn(4, 1, 64) * signs + 1e-3 * torch.randn(4, 8, 64)  # gradients that cancel
    loss = lambda m: (m(a) * g).sum()  # noqa: E731
    with GradStats(model, loss_reduction="sum") as stats:
        loss(model).backward()
    assert stats.coverage()["weight"] == "gram"
    with pytest.raises(GradNoiseError, match="nearly cancel.*elementwise=True"):
        stats.per_example_sq_norms()
    model.zero_grad(set_to_none=True)
    with GradStats(model, loss_reduction="sum", elementwise=True) as stats:
        loss(model).backward()
    want = torch.einsum("bto,bti->boi", g.double(), a.double()).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(
        stats.per_example_sq_norms()["weight"].double(), want, rtol=1e-4, atol=0
    )


@pytest.mark.parametrize(  # conv product and gram, linear product: all rebuild the summed gradient
    "layer, shape, method",
    [
        (lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 1, 1), "product"),
        (lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 2, 2), "gram"),
        (lambda: nn.Linear(16, 16), (2, 16), "product"),
    ],
)
def test_a_layer_input_changed_after_backward_is_refused_when_moments_rebuild_from_it(
    layer, shape, method
):
    torch.manual_seed(0)
    model = layer()
    x = torch.randn(*shape)
    with GradStats(model) as stats:
        model(x).square().mean().backward()
    assert stats.coverage()["weight"] == method
    want = model.weight.grad.clone()
    torch.testing.assert_close(stats.moments()["weight"].grad_sum, want * 2)
    with GradStats(model) as stats:
        model(x).square().mean().backward()
    norms = stats.per_example_sq_norms()["weight"]
    x.mul_(2.0)  # the caller reuses the input buffer before reading the moments
    assert torch.isfinite(norms).all()
    with pytest.raises(GradNoiseError, match="layer input changed in place after backward"):
        stats.moments()


def test_noise_statistics_do_not_read_a_layer_input_after_backward():
    """An input buffer refilled behind autograd's back (NumPy memory: no version bump) after
    backward leaves the norms, the noise scale and the layer estimates as they were (only
    ``moments()`` rebuilds from the input; the README says so)."""

    def measured(refill: bool):
        torch.manual_seed(0)
        model = nn.Linear(64, 256).double()  # B (d_in + d_out) < d_in d_out: product rebuilds
        buffer = np.random.default_rng(0).standard_normal((8, 64))
        with GradStats(model) as stats:
            model(torch.from_numpy(buffer)).pow(2).mean().backward()
        assert stats.coverage()["weight"] == "product"
        if refill:
            buffer[:] = np.random.default_rng(1).standard_normal((8, 64))
        _, traces, grad_sqs = stats.layer_estimates()
        return traces, grad_sqs, stats.noise_scale().b_simple, stats.per_example_sq_norms()

    kept, refilled = measured(False), measured(True)
    torch.testing.assert_close(refilled[0], kept[0], rtol=0, atol=0)
    torch.testing.assert_close(refilled[1], kept[1], rtol=0, atol=0)
    assert refilled[2] == kept[2]
    for name in kept[3]:
        torch.testing.assert_close(refilled[3][name], kept[3][name], rtol=0, atol=0)
