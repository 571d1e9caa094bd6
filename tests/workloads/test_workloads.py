import math

import pytest
import torch

from gradnoise import GradStats
from gradnoise.errors import GradNoiseError
from gradnoise.workloads import WORKLOADS, Workload, get_workload
from gradnoise.workloads.charlm import ALPHABET
from gradnoise.workloads.images import digit_images


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_parameter_is_measured(name):
    workload = get_workload(name, batch_size=4)
    with GradStats(workload.model, elementwise=True) as stats:
        workload.loss(workload.model, next(workload.batches)).backward()
    coverage = stats.coverage()
    assert set(coverage) == {n for n, _ in workload.model.named_parameters()}
    assert not [n for n, how in coverage.items() if how.startswith("skipped")]
    assert math.isfinite(stats.noise_scale().trace_sigma)


@pytest.mark.parametrize("name", WORKLOADS)
def test_a_seed_fixes_model_and_batches_without_touching_the_global_rng(name):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = get_workload(name, batch_size=3, seed=5), get_workload(name, batch_size=3, seed=5)
    assert torch.equal(torch.rand(1), before)
    for x, y in zip(next(a.batches), next(b.batches), strict=True):
        assert torch.equal(x, y)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert isinstance(a, Workload) and a.name == name and a.description


def test_charlm_batches_are_shifted_windows_and_the_untrained_loss_is_near_uniform():
    workload = get_workload("charlm", batch_size=5)
    tokens, targets = next(workload.batches)
    assert tokens.shape == targets.shape == (5, 64)
    assert torch.equal(tokens[:, 1:], targets[:, :-1])
    loss = float(workload.loss(workload.model, (tokens, targets)).detach())
    assert abs(loss - math.log(len(ALPHABET))) < 0.5


def test_images_are_learnable_in_a_few_hundred_steps():
    workload = get_workload("images", batch_size=32)
    optimizer = torch.optim.Adam(workload.model.parameters(), lr=workload.lr)
    losses = []
    for _, batch in zip(range(200), workload.batches, strict=False):
        loss = workload.loss(workload.model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20


def test_digit_images_have_ink_where_the_glyph_is():
    images, labels = digit_images(50, generator=torch.Generator().manual_seed(0))
    assert images.shape == (50, 1, 12, 12) and labels.min() >= 0 and labels.max() <= 9
    assert images.std() > 0.3  # noise on top of the glyphs


def test_unknown_workload_names_the_choices():
    with pytest.raises(
        GradNoiseError, match=r"workload: expected one of 'markov', 'images', 'charlm', got 'mnist'"
    ):
        get_workload("mnist")


def test_batch_size_below_two_is_refused():
    with pytest.raises(GradNoiseError, match=r"batch_size: expected an int >= 2 .*got 1\. Pass"):
        get_workload("charlm", batch_size=1)


def test_markov_floor_is_what_the_true_chain_scores():
    """The Bayes predictor (the chain's own probabilities) scores the stated floor on fresh
    windows. Budget: 2,000 windows of 64 targets; tolerance 4 standard errors of their mean."""
    from gradnoise.workloads.markov import MarkovLanguage

    language = MarkovLanguage.build(24, seed=0)
    context = 64
    chunk = language.sample(2000, context + 1, generator=torch.Generator().manual_seed(3))
    tokens, targets = chunk[:, :-1], chunk[:, 1:]
    first = language.stationary / language.stationary.sum(1, keepdim=True)
    probs = torch.empty(2000, context, dtype=torch.float64)
    probs[:, 0] = first[tokens[:, 0], targets[:, 0]]
    probs[:, 1:] = language.transitions[tokens[:, :-1], tokens[:, 1:], targets[:, 1:]]
    per_window = -probs.log().mean(1)
    tolerance = 4 * float(per_window.std()) / math.sqrt(2000)
    assert abs(float(per_window.mean()) - language.loss_floor(context)) < tolerance
    assert 1.0 < language.entropy_rate < math.log(24)


@pytest.mark.parametrize("name", ["markov", "images"])
def test_fresh_workloads_never_repeat_a_batch_and_hold_out_their_own(name):
    workload = get_workload(name, batch_size=16)
    first, second = next(workload.batches), next(workload.batches)
    assert not torch.equal(first[0], second[0])
    assert workload.heldout[0].shape[0] in (256, 512)
    assert not any(torch.equal(workload.heldout[0][:16], batch[0]) for batch in (first, second))


def test_charlm_holds_out_the_last_tenth_of_the_text():
    workload = get_workload("charlm", batch_size=4)
    tokens, targets = workload.heldout
    assert tokens.shape == targets.shape and tokens.shape[1] == 64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])


def test_digit_pool_has_the_requested_difficulty_mix():
    """4000 draws: shares within 4 binomial standard errors of the requested ones."""
    from gradnoise.workloads.images import digit_pool

    pool = digit_pool(4000, generator=torch.Generator().manual_seed(0), label_noise=0.1)
    se = (0.25 * 0.75 / 4000) ** 0.5
    assert abs(float(pool.hard.float().mean()) - 0.25) < 4 * se
    assert abs(float(pool.mislabelled.float().mean()) - 0.1) < 4 * (0.09 / 4000) ** 0.5
    assert bool((pool.labels != pool.true_labels).eq(pool.mislabelled).all())
    rare = float(torch.isin(pool.true_labels, torch.tensor([8, 9])).float().mean())
    assert abs(rare - 0.4 / 8.4) < 4 * (0.05 * 0.95 / 4000) ** 0.5
    assert pool.images.shape == (4000, 1, 12, 12)
    # hard images carry noise of sd 0.6 against 0.3 (the glyph adds at most ~0.3 of spread)
    assert float(pool.images[pool.hard].std()) > 1.5 * float(pool.images[~pool.hard].std())
