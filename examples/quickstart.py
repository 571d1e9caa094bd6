"""GradStats in ten lines: per-example gradient norms and the noise scale of one batch."""

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise import GradStats

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))

with GradStats(model) as stats:
    F.cross_entropy(model(x), y).backward()  # one ordinary forward and backward

print("per-example squared norms of layer 0:", stats.per_example_sq_norms()["0.weight"][:4])
print("coverage:", stats.coverage())
print("noise scale B_simple:", stats.noise_scale())
