"""Loss aggregations: each one's weights, TRL's formulas, and the measured variance ordering."""

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.rl.aggregation import METHODS, aggregate, aggregation_variance, aggregation_weights


def batch(seed=0, n=6, t=9):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(n, t, generator=g)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).float()
    return loss, mask, lengths


def test_aggregations_match_the_trl_and_paper_formulas():
    loss, mask, lengths = batch()
    n, t = loss.shape
    masked = loss * mask
    # TRL GRPOTrainer._compute_loss: "grpo", "bnpo", "dr_grpo"
    assert aggregate(loss, mask, "sequence_mean") == pytest.approx(
        ((masked.sum(-1) / mask.sum(-1)).mean()).item()
    )
    assert aggregate(loss, mask, "token_mean") == pytest.approx((masked.sum() / mask.sum()).item())
    assert aggregate(loss, mask, "constant") == pytest.approx((masked.sum() / (n * t)).item())
    # Delta-L: weights L_i^-alpha / sum_j L_j^-alpha on the response token sums
    for alpha in (1.0, 0.5):
        w = lengths.float().pow(-alpha) / lengths.float().pow(-alpha).sum()
        assert aggregate(loss, mask, "delta_l", alpha=alpha) == pytest.approx(
            (w * masked.sum(-1)).sum().item()
        )


def test_unbiased_weights_and_equal_lengths_collapse_the_methods():
    lengths = torch.tensor([3, 3, 3, 3])
    for method in ("token_mean", "sequence_mean", "constant"):
        torch.testing.assert_close(aggregation_weights(lengths, method), torch.full((4,), 1 / 12))
    # Delta-L's weights sum to one (unbiased for E[g_i]): the same direction, L times the scale
    torch.testing.assert_close(aggregation_weights(lengths, "delta_l"), torch.full((4,), 1 / 4))
    assert aggregation_weights(torch.tensor([1, 4, 9]), "delta_l").sum().item() == pytest.approx(
        1.0
    )


def test_measured_variance_ranks_delta_l_below_the_constant_normaliser():
    """Synthetic g_i = mu + sqrt(L_i) eps_i, so Var(g_i) = L_i (He et al. 2025's model). Both are
    unbiased up to scale; the scale-free variance is E[L]/N for the constant normaliser and about
    1/(N H) for Delta-L (H = harmonic mean of L): 10.5 vs ~5.6 for L uniform on 1..20, a ~1.9x gap.
    With 400 batches each estimate has ~7% relative error, so a 0.75 threshold cannot flip by
    chance."""
    g = torch.Generator().manual_seed(0)
    m, d = 4000, 8
    lengths = torch.randint(1, 21, (m,), generator=g)
    grads = torch.ones(d) + lengths.float().sqrt()[:, None] * torch.randn(m, d, generator=g)
    out = aggregation_variance(grads, lengths, batch_size=16, num_batches=400, generator=g)
    assert out["delta_l"].relative < 0.75 * out["constant"].relative
    assert set(out) == set(METHODS)
    # the trace equals the plain unbiased variance of the batch gradients it was built from
    moments = out["delta_l"].moments
    per_batch = moments.grad_sum / moments.n
    assert moments.n == 400 and per_batch.shape == (d,)


def test_trace_matches_a_direct_variance_of_the_same_draws():
    g = torch.Generator().manual_seed(1)
    grads, lengths = torch.randn(50, 3, generator=g), torch.randint(1, 6, (50,), generator=g)
    out = aggregation_variance(
        grads,
        lengths,
        batch_size=5,
        num_batches=30,
        methods=("token_mean",),
        generator=torch.Generator().manual_seed(2),
    )
    g2 = torch.Generator().manual_seed(2)
    draws = [torch.randperm(50, generator=g2)[:5] for _ in range(30)]
    direct = torch.stack([aggregation_weights(lengths[d], "token_mean") @ grads[d] for d in draws])
    assert out["token_mean"].trace == pytest.approx(direct.var(0).sum().item(), rel=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: aggregation_weights(torch.tensor([1, 2]), "mean"), "one of \\('token_mean'"),
        (lambda: aggregation_weights(torch.tensor([1, 0]), "token_mean"), "every length >= 1"),
        (lambda: aggregation_weights(torch.tensor([]), "token_mean"), "at least one response"),
        (lambda: aggregate(torch.ones(2, 3), torch.ones(2, 4)), "same \\(N, T\\) shape"),
        (
            lambda: aggregation_variance(
                torch.ones(3, 2), torch.ones(4), batch_size=2, generator=torch.Generator()
            ),
            "\\(M, D\\) gradients and M lengths",
        ),
        (
            lambda: aggregation_variance(
                torch.ones(3, 2), torch.ones(3), batch_size=5, generator=torch.Generator()
            ),
            "1 <= batch_size <= 3",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, match):
    with pytest.raises(GradNoiseError, match=match):
        call()
