"""Gradient Agreement Filtering against hand cases, its errors, and exact resume."""

import pytest
import torch

from gradnoise.control import GradientAgreementFilter, agreement_filter, cosine_distance
from gradnoise.errors import GradNoiseError


def test_cosine_distance_hand_values():
    a, b = [torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 2.0])]
    assert float(cosine_distance(a, b)) == pytest.approx(1.0)
    assert float(cosine_distance(a, [torch.tensor([-3.0, 0.0])])) == pytest.approx(2.0)
    assert float(cosine_distance(a, [torch.tensor([5.0, 0.0])])) == pytest.approx(0.0)


def test_agreeing_gradients_are_averaged_and_a_conflicting_one_is_dropped():
    g1, g2 = (
        [torch.tensor([1.0, 1.0]), torch.tensor([2.0])],
        [torch.tensor([1.0, 0.0]), torch.tensor([1.0])],
    )
    bad = [torch.tensor([-1.0, -1.0]), torch.tensor([-2.0])]
    mean, kept = agreement_filter([g1, bad, g2], threshold=1.0)
    assert kept.tolist() == [True, False, True]
    torch.testing.assert_close(mean[0], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(mean[1], torch.tensor([1.5]))


def test_threshold_two_is_plain_averaging():
    grads = [[torch.randn(3, generator=torch.Generator().manual_seed(i))] for i in range(5)]
    mean, kept = agreement_filter(grads, threshold=2.0)
    assert bool(kept.all())
    torch.testing.assert_close(mean[0], torch.stack([g[0] for g in grads]).mean(0))


def test_filter_counts_and_resumes_exactly():
    grads = [[torch.randn(4, generator=torch.Generator().manual_seed(i))] for i in range(12)]
    steps = [grads[i : i + 3] for i in range(0, 12, 3)]
    straight = GradientAgreementFilter(threshold=0.9)
    outs = [straight(step)[0][0] for step in steps]
    first = GradientAgreementFilter(threshold=0.9)
    for step in steps[:2]:
        first(step)
    resumed = GradientAgreementFilter(threshold=0.9)
    resumed.load_state_dict(first.state_dict())
    rest = [resumed(step)[0][0] for step in steps[2:]]
    assert all(torch.equal(a, b) for a, b in zip(outs[2:], rest, strict=True))
    assert int(resumed.kept) == int(straight.kept) and resumed.seen == straight.seen == 12
    assert int(straight.kept) < 12  # random directions: some were dropped


@pytest.mark.parametrize("threshold", [-0.1, 2.5, "1"])
def test_rejects_bad_threshold(threshold):
    with pytest.raises(
        GradNoiseError,
        match=r"GradientAgreementFilter\(threshold=...\): expected a "
        r"cosine distance in \[0, 2\], got .*Use e.g. threshold=1.0",
    ):
        GradientAgreementFilter(threshold=threshold)


def test_rejects_a_single_gradient_and_a_foreign_state():
    gaf = GradientAgreementFilter()
    with pytest.raises(GradNoiseError, match="expected at least 2 micro-batch .* got 1. Split"):
        gaf([[torch.ones(2)]])
    with pytest.raises(
        GradNoiseError,
        match="expected a state saved with threshold=1.0, got threshold=0.5. Construct",
    ):
        gaf.load_state_dict(GradientAgreementFilter(threshold=0.5).state_dict())
