"""keep_set and el2n on hand-made scores whose answers are known."""

import re

import pytest
import torch
import torch.nn.functional as F

from gradnoise.data import el2n, keep_set
from gradnoise.errors import GradNoiseError
from gradnoise.stats import ExampleScores

SCORES = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 0.0, 6.0, 4.0])  # a permutation of 0..9


def test_hardest_and_easiest_keep_the_top_and_bottom_scores():
    assert keep_set(SCORES, 0.3).tolist() == [2, 4, 6]  # scores 9, 7, 8
    assert keep_set(SCORES, 0.3, rule="easiest").tolist() == [1, 5, 7]  # 1, 2, 0


def test_skip_hardest_drops_the_very_top_first():
    assert keep_set(SCORES, 0.3, skip_hardest=0.2).tolist() == [0, 4, 8]  # 7, 6, 5


def test_mixed_keeps_half_hardest_and_the_rest_at_random():
    keep = keep_set(SCORES, 0.4, rule="mixed", seed=3)
    assert keep.numel() == 4 and {2, 6} <= set(keep.tolist())  # the two hardest: 9 and 8
    draws = {tuple(keep_set(SCORES, 0.4, rule="mixed", seed=s).tolist()) for s in range(20)}
    assert len(draws) > 1  # the other half varies with the seed


def test_random_is_a_seeded_uniform_subset():
    """Each id is kept with probability 1/2: over 400 seeds, every count within 4 sd of 200."""
    counts = torch.zeros(10)
    for seed in range(400):
        counts[keep_set(SCORES, 0.5, rule="random", seed=seed)] += 1
    assert bool(((counts - 200).abs() < 4 * 10).all())
    assert torch.equal(
        keep_set(SCORES, 0.5, rule="random", seed=1), keep_set(SCORES, 0.5, rule="random", seed=1)
    )


def test_example_scores_feed_keep_set_and_unvisited_examples_count_as_the_median():
    scores = ExampleScores(6)
    scores.update(torch.arange(5), grad_sq_norms=torch.tensor([1.0, 16.0, 4.0, 9.0, 25.0]))
    keep = keep_set(scores, 0.5, score="grad_norm")  # norms 1, 4, 2, 3, 5 and NaN -> median 3
    assert keep.tolist()[:2] == [1, 4] and keep.numel() == 3 and keep.tolist()[2] in (3, 5)


def test_el2n_is_the_error_norm_of_the_softmax():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    labels = torch.tensor([0, 1])
    want = torch.tensor(
        [(0.5**2 + 0.5**2) ** 0.5, 2**0.5 * float(torch.sigmoid(torch.tensor(20.0)))]
    )
    torch.testing.assert_close(el2n(logits, labels), want)
    probs = logits.softmax(-1)
    torch.testing.assert_close(el2n(logits, labels), (probs - F.one_hot(labels, 2)).norm(dim=1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: keep_set(SCORES, 0), "keep_set fraction: expected a number in (0, 1]"),
        (lambda: keep_set(SCORES, 0.5, rule="best"), "keep_set rule: expected one of"),
        (lambda: keep_set(SCORES, 0.9, skip_hardest=0.2), "skip at most what pruning removes"),
        (lambda: keep_set(ExampleScores(3), 0.5), "name the score to prune by"),
        (lambda: keep_set(torch.ones(2, 2), 0.5), "an ExampleScores or an (N,) tensor"),
        (lambda: el2n(torch.ones(3), torch.zeros(3, dtype=torch.long)), "logits (B, C)"),
    ],
)
def test_bad_input_is_refused_with_a_fix(call, message):
    with pytest.raises(GradNoiseError, match="(?i)" + re.escape(message)):
        call()
