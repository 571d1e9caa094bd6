"""The default workload: a small character-level transformer LM on embedded Shakespeare sonnets.

A batch is ``(tokens, targets)``, both ``(B, T)`` windows of the text, ``targets`` shifted by one
character. Attention is written with ``nn.Linear`` projections and ``scaled_dot_product_attention``
so every parameter goes through a layer rule of GradStats; position ids are expanded to ``(B, T)``
so the examples stay on dim 0 of every layer input.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.workloads.base import Workload
from gradnoise.workloads.corpus import TEXT

__all__ = ["CharTransformer", "make"]

ALPHABET = sorted(set(TEXT))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc_in, self.fc_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln_1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))


class CharTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final LayerNorm and a linear head."""

    def __init__(
        self, vocab: int, *, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 64
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.head(self.ln_f(self.blocks(self.tok(tokens) + self.pos(positions))))


def windows(
    data: torch.Tensor, batch_size: int, context: int, *, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random ``(tokens, targets)`` windows of ``data``."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size, 1), generator=generator)
        index = starts + torch.arange(context + 1)
        chunk = data[index]
        yield chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-character cross-entropy (equal lengths: the mean of per-window means)."""
    tokens, targets = batch
    return F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


HELDOUT_FRACTION = 0.1


def make(*, batch_size: int = 32, seed: int = 0, context: int = 64) -> Workload:
    """The character LM workload (about 110k parameters) on the first 90% of the text.

    The last 10% is held out (``Workload.heldout``: its non-overlapping windows). The training
    part is small enough to be memorized: after a few hundred steps the training loss keeps
    falling while the held-out loss rises, so prefer ``markov`` for a noise scale that means
    what it does in real training.
    """
    data = torch.tensor([ALPHABET.index(c) for c in TEXT])
    split = int(len(data) * (1 - HELDOUT_FRACTION))
    data, tail = data[:split], data[split:]
    count = (len(tail) - 1) // context
    index = torch.arange(count).unsqueeze(1) * context + torch.arange(context + 1)
    heldout = tail[index]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CharTransformer(len(ALPHABET), context=context)
    generator = torch.Generator().manual_seed(seed)
    return Workload(
        name="charlm",
        model=model,
        batches=windows(data, batch_size, context, generator=generator),
        loss=lm_loss,
        lr=3e-3,
        description=f"character-level transformer LM, {split} characters of sonnets "
        "(memorized within a few hundred steps)",
        heldout=(heldout[:, :-1], heldout[:, 1:]),
    )
