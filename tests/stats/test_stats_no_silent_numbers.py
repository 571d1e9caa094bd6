"""Stats cases of "no silently wrong number": corrupted NoiseScale state, extreme float32 scales."""

import math

import pytest
import torch

from gradnoise.errors import GradNoiseError
from gradnoise.stats import NoiseScale
from gradnoise.stats.moments import GradMoments
from gradnoise.stats.quantities import gradient_noise_scale


def _filled(**kwargs) -> NoiseScale:
    noise = NoiseScale(**kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        noise.update(GradMoments.from_per_example(torch.randn(8, 4, generator=gen) + 1))
    return noise


def _corrupt(state, **average):
    return {**state, "average": {**state["average"], **average}}


@pytest.mark.parametrize(
    ("window", "change", "got"),
    [
        (None, {"steps": -3}, r"steps=-3"),
        (None, {"steps": "3"}, r"steps='3'"),
        (None, {"x": torch.zeros(5, dtype=torch.float64)}, r"x of shape"),
        (None, {"zz": [[1.0]]}, r"zz of shape list"),
        (None, {"sq_weight": None}, r"sq_weight=None"),
        (3, {"rows": torch.zeros(2, 7, dtype=torch.float64)}, r"rows of shape"),
        (3, {"steps": 1}, r"steps=1 with 3 rows"),
    ],
)
def test_corrupted_noise_scale_state_is_refused_without_change(window, change, got):
    noise = _filled(window=window)
    state, before = noise.state_dict(), noise.estimate()
    with pytest.raises(GradNoiseError, match=rf"NoiseScale.load_state_dict: expected .*got {got}"):
        noise.load_state_dict(_corrupt(state, **change))
    assert noise.estimate() == before


def test_noise_scale_state_with_missing_keys_or_wrong_names_is_refused():
    noise = _filled()
    state = noise.state_dict()
    average = {k: v for k, v in state["average"].items() if k != "zz"}
    with pytest.raises(GradNoiseError, match=r"got average without \['zz'\]"):
        noise.load_state_dict({**state, "average": average})
    with pytest.raises(GradNoiseError, match=r"got names of type int"):
        noise.load_state_dict({**state, "names": 3})
    fresh = NoiseScale()
    fresh.load_state_dict(state)  # a good state still loads
    assert fresh.estimate() == noise.estimate()


@pytest.mark.parametrize("scale", [1e30, 1e-25])
def test_noise_scale_is_scale_invariant_for_float32_gradients(scale):
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(16, 10, generator=gen) + 0.5
    reference = gradient_noise_scale(GradMoments.from_per_example(grads.double()))
    scaled = (grads * scale).float()  # float32 per-example gradients at an extreme scale
    # the per-example norms overflow/underflow float32, so the engine keeps that sum wider;
    # grad_sum stays float32 (finite), and its square is what used to overflow or vanish
    record = GradMoments(
        n=16,
        grad_sum=scaled.sum(0),
        sq_norm_sum=scaled.double().pow(2).sum(),
    )
    estimate = gradient_noise_scale(record)
    assert math.isfinite(estimate.b_simple)
    assert estimate.b_simple == pytest.approx(reference.b_simple, rel=1e-4)
