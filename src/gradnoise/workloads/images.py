"""A small image workload: a CNN that reads noisy, shifted digits drawn from an embedded font.

The ten digits of a 5x7 bitmap font are stamped at a random offset into a 12x12 canvas, blurred
a little and covered with Gaussian noise. Every batch is generated fresh from the seed's stream
(no image is seen twice, no files read); a held-out set of 512 comes from its own generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.workloads.base import Workload

__all__ = ["DigitPool", "digit_classifier", "digit_images", "digit_pool", "fresh_images", "make"]

GLYPHS = {  # 5 columns x 7 rows per digit, '#' = ink
    0: [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    1: ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    2: [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    3: ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    4: ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    5: ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    6: ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    7: ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    8: [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    9: [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}
SIZE = 12


def _glyph(digit: int) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in row] for row in GLYPHS[digit]], dtype=torch.float32)


def _render(
    labels: torch.Tensor,
    ink: torch.Tensor,
    noise: torch.Tensor,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Stamp each label's glyph (times its ``ink``) at a random offset, blur, add noise."""
    count = labels.numel()
    rows = torch.randint(0, SIZE - 7 + 1, (count,), generator=generator)
    cols = torch.randint(0, SIZE - 5 + 1, (count,), generator=generator)
    images = torch.zeros(count, 1, SIZE, SIZE)
    glyphs = [_glyph(d) for d in range(10)]
    for i in range(count):
        r, c = int(rows[i]), int(cols[i])
        images[i, 0, r : r + 7, c : c + 5] = glyphs[int(labels[i])] * ink[i]
    blur = torch.full((1, 1, 3, 3), 1 / 9)
    images = 0.7 * images + 0.3 * F.conv2d(images, blur, padding=1)
    return images + noise.view(-1, 1, 1, 1) * torch.randn(images.shape, generator=generator)


def digit_images(count: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images ``(count, 1, 12, 12)`` and their labels, reproducible from ``generator``."""
    labels = torch.randint(0, 10, (count,), generator=generator)
    ones = torch.ones(count)
    return _render(labels, ones, 0.3 * ones, generator=generator), labels


@dataclass(frozen=True)
class DigitPool:
    """A fixed pool of digit images whose examples differ in difficulty.

    ``labels`` are the training labels (some flipped), ``true_labels`` the drawn digits,
    ``hard`` marks the faint, noisy images and ``mislabelled`` the flipped ones.
    """

    images: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor
    hard: torch.Tensor
    mislabelled: torch.Tensor


def digit_pool(
    count: int,
    *,
    generator: torch.Generator,
    label_noise: float = 0.0,
    hard_fraction: float = 0.25,
    rare_classes: tuple[int, ...] = (8, 9),
    rare_weight: float = 0.2,
) -> DigitPool:
    """A pool for data selection: rare classes (drawn ``rare_weight`` times as often as the
    others), a ``hard_fraction`` of faint (ink 0.45) and noisy (sd 0.6) images, and a
    ``label_noise`` share of labels replaced by a different random digit."""
    weights = torch.ones(10)
    weights[list(rare_classes)] = rare_weight
    true_labels = torch.multinomial(weights, count, replacement=True, generator=generator)
    hard = torch.rand(count, generator=generator) < hard_fraction
    ink = torch.where(hard, 0.45, 1.0)
    noise = torch.where(hard, 0.6, 0.3)
    images = _render(true_labels, ink, noise, generator=generator)
    mislabelled = torch.rand(count, generator=generator) < label_noise
    shift = torch.randint(1, 10, (count,), generator=generator)
    labels = torch.where(mislabelled, (true_labels + shift) % 10, true_labels)
    return DigitPool(images, labels, true_labels, hard, mislabelled)


def digit_classifier(seed: int) -> nn.Module:
    """The workload's CNN: conv 1->16, conv 16->32, linear 10 (about 8k parameters)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 10),
        )


def fresh_images(
    batch_size: int, *, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of newly generated images."""
    while True:
        yield digit_images(batch_size, generator=generator)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


HELDOUT_EXAMPLES = 512


def make(*, batch_size: int = 32, seed: int = 0) -> Workload:
    """The digit-image workload: conv 1->16, conv 16->32, linear 10 (about 8k parameters)."""
    heldout = digit_images(HELDOUT_EXAMPLES, generator=torch.Generator().manual_seed(10_000 + seed))
    model = digit_classifier(seed)
    return Workload(
        name="images",
        model=model,
        batches=fresh_images(batch_size, generator=torch.Generator().manual_seed(seed)),
        loss=classification_loss,
        lr=3e-3,
        description="small CNN on freshly generated 12x12 images of noisy, shifted digits",
        heldout=heldout,
    )
