"""A factory for `gradnoise profile --model`: profile your own model from the command line.

    gradnoise profile --model examples/profile_factory.py:make --steps 300 --every 20

The factory is called as ``make(batch_size=B)`` and returns ``(model, batches, loss_fn)``: an
``nn.Module``, an iterable of batches (tuples of tensors, examples on dim 0) and
``loss_fn(model, batch)``, the mean loss over the batch.
"""

import torch
import torch.nn.functional as F
from torch import nn


def batches(batch_size: int, *, seed: int = 0):
    """Endless batches of a noisy linear regression problem."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 1, generator=generator)
    while True:
        x = torch.randn(batch_size, 16, generator=generator)
        yield x, x @ weight + 0.3 * torch.randn(batch_size, 1, generator=generator)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make(batch_size: int):
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, batches(batch_size), loss_fn
