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
        GradNoiseError, match=r"workload: expected one of 'charlm', 'images', got 'mnist'"
    ):
        get_workload("mnist")


def test_batch_size_below_two_is_refused():
    with pytest.raises(GradNoiseError, match=r"batch_size: expected an int >= 2 .*got 1\. Pass"):
        get_workload("charlm", batch_size=1)
