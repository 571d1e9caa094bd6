"""A small image workload: a CNN that reads noisy, shifted digits drawn from an embedded font.

The ten digits of a 5x7 bitmap font are stamped at a random offset into a 12x12 canvas, blurred
a little and covered with Gaussian noise. Every batch is generated fresh from the seed's stream
(no image is seen twice, no files read); a held-out set of 512 comes from its own generator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.workloads.base import Workload

__all__ = ["digit_images", "fresh_images", "make"]

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


def digit_images(count: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images ``(count, 1, 12, 12)`` and their labels, reproducible from ``generator``."""
    labels = torch.randint(0, 10, (count,), generator=generator)
    rows = torch.randint(0, SIZE - 7 + 1, (count,), generator=generator)
    cols = torch.randint(0, SIZE - 5 + 1, (count,), generator=generator)
    images = torch.zeros(count, 1, SIZE, SIZE)
    glyphs = [_glyph(d) for d in range(10)]
    for i in range(count):
        r, c = int(rows[i]), int(cols[i])
        images[i, 0, r : r + 7, c : c + 5] = glyphs[int(labels[i])]
    blur = torch.full((1, 1, 3, 3), 1 / 9)
    images = 0.7 * images + 0.3 * F.conv2d(images, blur, padding=1)
    return images + 0.3 * torch.randn(images.shape, generator=generator), labels


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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 10),
        )
    return Workload(
        name="images",
        model=model,
        batches=fresh_images(batch_size, generator=torch.Generator().manual_seed(seed)),
        loss=classification_loss,
        lr=3e-3,
        description="small CNN on freshly generated 12x12 images of noisy, shifted digits",
        heldout=heldout,
    )
