"""Per-example scores: exact VoG, the sketched VoG's budget, top-k queries, errors."""

import math

import pytest
import torch
from torch import nn

from gradnoise.errors import GradNoiseError
from gradnoise.stats.engine import GradStats
from gradnoise.stats.scores import ExampleScores, class_logit_input_grads


def test_vog_is_the_mean_over_coordinates_of_the_variance_over_checkpoints():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 6, 3, 4, generator=gen, dtype=torch.float64)  # (K, N, 3, 4)
    scores = ExampleScores(6)
    ids = torch.tensor([3, 0, 5, 1, 4, 2])
    for checkpoint in grads:
        scores.update_vog(ids, checkpoint)
    want = grads.var(0, unbiased=False).mean((1, 2))  # per position in ids
    got = scores.values("vog")[ids]
    torch.testing.assert_close(got, want)


def test_sketched_vog_is_unbiased_within_its_budget():
    # D = 500 coordinates, sketch k = 128: relative sd of one example's sketched VoG is about
    # sqrt(2/k) = 12.5%; averaged over N = 200 examples it is < 1%, so 5% on the mean ratio is > 5
    # sd, and every single ratio must lie within 5 sd (62.5%).
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(4, 200, 500, generator=gen, dtype=torch.float64)
    exact, sketched = ExampleScores(200), ExampleScores(200, sketch_dim=128, seed=3)
    for checkpoint in grads:
        exact.update_vog(torch.arange(200), checkpoint)
        sketched.update_vog(torch.arange(200), checkpoint)
    ratio = sketched.values("vog") / exact.values("vog")
    assert abs(float(ratio.mean()) - 1) < 0.05
    assert float((ratio - 1).abs().max()) < 0.625


def test_grad_norm_and_loss_scores_stream_and_rank():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    scores = ExampleScores(10)
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    norms, losses = torch.zeros(10, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    for ids in (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([4, 5, 6])):
        with GradStats(model) as stats:
            per_example = nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")
            per_example.mean().backward()
        scores.update(ids, grad_sq_norms=stats.total_sq_norms(), losses=per_example)
        norms[ids] = stats.total_sq_norms().sqrt()  # the model does not change here
        losses[ids] = per_example.detach()
    seen = torch.arange(7)
    torch.testing.assert_close(scores.values("grad_norm")[seen], norms[seen])
    torch.testing.assert_close(scores.values("loss")[seen], losses[seen])
    assert scores.values("loss")[7:].isnan().all()  # never seen: undefined, not zero
    ids, values = scores.top_k("loss", 3)
    assert ids.tolist() == losses[seen].topk(3).indices.tolist()
    torch.testing.assert_close(values, losses[seen].topk(3).values)
    ids, _ = scores.top_k("grad_norm", 20, largest=False)
    assert sorted(ids.tolist()) == list(range(7))  # only defined scores are returned
    assert scores.top_k("vog", 5)[0].numel() == 0


def test_class_logit_input_grads_are_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    got = class_logit_input_grads(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # parameters untouched
    for i in range(6):
        xi = x[i : i + 1].clone().requires_grad_(True)
        model(xi)[0, y[i]].backward()
        torch.testing.assert_close(got[i], xi.grad[0])


def test_state_dict_round_trip():
    scores = ExampleScores(4, sketch_dim=2, seed=0)
    scores.update(torch.tensor([0, 1]), losses=torch.tensor([1.0, 2.0]))
    for value in (1.0, 3.0):
        scores.update_vog(torch.tensor([2]), torch.full((1, 5), value))
    copy = ExampleScores(4, sketch_dim=2, seed=0)
    copy.load_state_dict(scores.state_dict())
    for name in ("loss", "vog"):
        torch.testing.assert_close(copy.values(name), scores.values(name), equal_nan=True)


def test_errors():
    with pytest.raises(GradNoiseError, match=r"num_examples=...\): expected a positive int"):
        ExampleScores(0)
    with pytest.raises(GradNoiseError, match=r"sketch_dim=...\): expected None or a positive"):
        ExampleScores(3, sketch_dim=0)
    scores = ExampleScores(3)
    with pytest.raises(GradNoiseError, match=r"integer ids in \[0, 3\), got ids in \[0, 3\]"):
        scores.update(torch.tensor([0, 3]), losses=torch.ones(2))
    with pytest.raises(GradNoiseError, match="got dtype torch.float32"):
        scores.update(torch.tensor([0.0]), losses=torch.ones(1))
    with pytest.raises(GradNoiseError, match="ExampleScores losses: expected a leading dimension"):
        scores.update(torch.tensor([0, 1]), losses=torch.ones(3))
    with pytest.raises(GradNoiseError, match="expected distinct ids within one call"):
        scores.update_vog(torch.tensor([1, 1]), torch.ones(2, 4))
    assert math.isnan(float(scores.values("loss")[0]))  # nothing was recorded by failed calls
    scores.update_vog(torch.tensor([1]), torch.ones(1, 4))
    with pytest.raises(GradNoiseError, match="expected vectors of dimension 4"):
        scores.update_vog(torch.tensor([1]), torch.ones(1, 5))
    with pytest.raises(GradNoiseError, match="ExampleScores score: expected one of"):
        scores.values("grand")
    with pytest.raises(GradNoiseError, match=r"top_k\(k=...\): expected a positive int"):
        scores.top_k("loss", 0)
