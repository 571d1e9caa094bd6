"""Edge-case models for the engine tests (tied weights, attention, fallback modules)."""

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    """A custom module with a bare parameter: only the torch.func fallback can measure it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.gain + torch.tanh(x) * self.gain.pow(2)


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (fallback for the whole module), a custom module and a ruled head."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.scale = Scale(dim)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(self.scale(h)).mean(1))


class SharedTwice(nn.Module):
    """One Linear applied twice, and a conv1d + group norm path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1, groups=3)
        self.norm = nn.GroupNorm(2, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.norm(self.conv(x)).transpose(1, 2)  # (B, L, 6)
        h = self.shared(torch.relu(self.shared(h)))
        return self.head(h.mean(1))


def classification_loss(model, x, y):
    return F.cross_entropy(model(x), y)
