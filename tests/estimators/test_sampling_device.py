"""Random draws land on the parameters' device, whichever device the generator lives on."""

import torch

from gradnoise.estimators.core import draw


def test_draws_follow_the_generator_then_move_to_the_tensor():
    like = torch.zeros(2, dtype=torch.float64)
    got = draw("normal", (4, 2), like, torch.Generator().manual_seed(3))
    want = torch.randn((4, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(got, want)  # the same stream as a plain CPU draw
    moved = draw("uniform", (5,), torch.empty(1, device="meta"), torch.Generator())
    assert moved.device.type == "meta" and moved.shape == (5,)  # a CPU generator, elsewhere


def test_without_a_generator_draws_on_the_tensors_device():
    out = draw("uniform", (3,), torch.empty(1, device="meta", dtype=torch.float16), None)
    assert out.device.type == "meta" and out.dtype == torch.float16
