r"""A CPU-sized diffusion workload: DDPM epsilon-prediction on a generated 2-D Gaussian mixture.

**Data.** Fresh draws from 8 Gaussians of standard deviation ``spread`` centred on the unit
circle (every batch new; the held-out set has its own generator).

**Forward process** (Ho et al. 2020). ``steps`` = 1000 timesteps with the linear schedule
:math:`\beta_t` from 1e-4 to 0.02 and :math:`\bar\alpha_t = \prod_{s \le t}(1 - \beta_s)`;
:math:`x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon`.

**Objective.** The simple loss :math:`\ell(x_0, t, \varepsilon) = \frac12
\|\varepsilon_\theta(x_t, t) - \varepsilon\|^2` (mean over the 2 coordinates) with
:math:`t \sim U\{0, \dots, T-1\}`. The timesteps are split into ``num_buckets`` equal buckets;
drawing a bucket k and then t uniformly inside it, with weight :math:`w = 1/(K p_k)`, estimates
the same objective without bias for any bucket probabilities :math:`p_k > 0`
(:class:`gradnoise.sampled.TimestepSampler` chooses them).

**Model.** An MLP on :math:`[x_t, \mathrm{emb}(t)]`, the sinusoidal embedding of
:math:`t / T` (16 frequencies), hidden width 128, 3 SiLU layers: about 37k parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.errors import require

__all__ = ["DDPM", "Denoiser", "mixture", "timesteps_in_buckets"]


def mixture(
    count: int, *, spread: float = 0.05, modes: int = 8, generator: torch.Generator
) -> torch.Tensor:
    """``(count, 2)`` draws from ``modes`` Gaussians of std ``spread`` on the unit circle."""
    mode = torch.randint(0, modes, (count,), generator=generator)
    angle = 2 * math.pi * mode.to(torch.float32) / modes
    centres = torch.stack([angle.cos(), angle.sin()], 1)
    return centres + spread * torch.randn(count, 2, generator=generator)


def timesteps_in_buckets(
    buckets: torch.Tensor, num_buckets: int, steps: int, *, generator: torch.Generator
) -> torch.Tensor:
    """A timestep drawn uniformly inside each bucket (bucket k holds steps
    ``[k T / K, (k + 1) T / K)``; ``steps`` must be a multiple of ``num_buckets``)."""
    require(
        steps % num_buckets == 0, "timesteps_in_buckets", "steps a multiple of num_buckets",
        f"steps={steps}, num_buckets={num_buckets}", "choose num_buckets dividing steps",
    )  # fmt: skip
    width = steps // num_buckets
    offset = torch.randint(0, width, buckets.shape, generator=generator)
    return buckets * width + offset


class Denoiser(nn.Module):
    """:math:`\\varepsilon_\\theta(x_t, t)`: an MLP on the noisy point and a time embedding."""

    def __init__(self, hidden: int = 128, depth: int = 3, frequencies: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(frequencies) * math.pi)
        layers, width = [], 2 + 2 * frequencies
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t_frac: torch.Tensor) -> torch.Tensor:
        angles = t_frac.unsqueeze(1) * self.freqs
        return self.net(torch.cat([x, angles.sin(), angles.cos()], 1))


@dataclass(frozen=True)
class DDPM:
    """The forward process and the simple loss (module docstring), with ``steps`` timesteps."""

    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @property
    def alpha_bar(self) -> torch.Tensor:
        betas = torch.linspace(self.beta_start, self.beta_end, self.steps, dtype=torch.float64)
        return torch.cumprod(1 - betas, 0).to(torch.float32)

    def losses(
        self, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """``(B,)`` per-example losses: half the squared error of the predicted noise, averaged
        over the coordinates."""
        ab = self.alpha_bar[t].unsqueeze(1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return 0.5 * (model(xt, t.to(torch.float32) / self.steps) - noise).pow(2).mean(1)

    def heldout(
        self, count: int = 4096, *, seed: int = 10_000, spread: float = 0.05
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fixed held-out set ``(x0, t, noise)`` with uniform timesteps: the real objective."""
        generator = torch.Generator().manual_seed(seed)
        x0 = mixture(count, spread=spread, generator=generator)
        t = torch.randint(0, self.steps, (count,), generator=generator)
        return x0, t, torch.randn(count, 2, generator=generator)
