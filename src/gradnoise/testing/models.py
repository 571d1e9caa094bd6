"""Small models used by the tests and the engine benchmark (W1, W2, W3 and edge cases).

Each ``make_*`` returns ``(model, batch, loss_fn)`` where ``loss_fn(model, *batch)`` is the mean
over the batch of per-example losses, so the reference loop and GradStats see the same loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TinyGPT",
    "classification_loss",
    "lm_loss",
    "make_cnn",
    "make_gpt",
    "make_mlp",
]


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy; with equal lengths it is the mean of per-sequence means."""
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_mlp(batch: int = 128, *, generator: torch.Generator | None = None):
    """W1: MLP 784-512-512-10 on random inputs."""
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    x = torch.randn(batch, 784, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return model, (x, y), classification_loss


def make_cnn(batch: int = 64, *, generator: torch.Generator | None = None):
    """W2: conv 3->32 3x3, conv 32->64 3x3, maxpool, linear 10, on 3x32x32 inputs."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 16 * 16, 10),
    )
    x = torch.randn(batch, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return model, (x, y), classification_loss


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc_in, self.fc_out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        split = lambda t: t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))


class TinyGPT(nn.Module):
    """A GPT-like LM: token and position embeddings, pre-LN blocks, separate q/k/v/o projections.

    With the W3 sizes (vocab 1000, dim 256, 2 layers, context 128) it has 38 parameter tensors.
    ``tie=True`` shares the token embedding with the output layer.
    """

    def __init__(
        self,
        vocab: int = 1000,
        dim: int = 256,
        layers: int = 2,
        heads: int = 4,
        context: int = 128,
        *,
        tie: bool = False,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=not tie)
        if tie:
            self.head.weight = self.tok.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(
                    module.weight,
                    std=0.02
                    if not isinstance(module, nn.Linear)
                    else 1 / math.sqrt(module.in_features),
                )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Positions expanded to (B, T): every example's use of the table stays visible.
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        positions = positions.contiguous()  # Opacus' embedding norms need contiguous ids
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_gpt(
    batch: int = 16,
    *,
    vocab: int = 1000,
    dim: int = 256,
    layers: int = 2,
    context: int = 128,
    tie: bool = False,
    generator: torch.Generator | None = None,
):
    """W3: TinyGPT(vocab 1000, dim 256, 2 layers, T=128), B=16, random tokens."""
    model = TinyGPT(vocab, dim, layers, heads=4, context=context, tie=tie)
    tokens = torch.randint(0, vocab, (batch, context + 1), generator=generator)
    return model, (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()), lm_loss
