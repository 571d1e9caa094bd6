"""A running noise scale with an error bar, read every 100 steps, and resumed from a checkpoint."""

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise import GradStats
from gradnoise.stats.running import NoiseScale

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.002)
teacher = torch.randn(10, 1)
noise = NoiseScale(beta=0.95, confidence=0.9)  # averages |G|^2 and tr(Sigma), then divides

for step in range(1, 301):
    x = torch.randn(32, 10)
    y = x @ teacher + 0.5 * torch.randn(32, 1)
    with GradStats(model) as stats:
        F.mse_loss(model(x), y).backward()
    noise.update(stats)  # tensor ops only; no host sync
    optimizer.step()
    optimizer.zero_grad()
    if step % 100 == 0:
        r = noise.estimate()  # the one host sync
        print(f"step {step}: B_simple {r.b_simple:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}]")
    if step == 150:  # a checkpoint: the estimate survives a restart
        saved = noise.state_dict()
        noise = NoiseScale(beta=0.95, confidence=0.9)
        noise.load_state_dict(saved)

reading = noise.estimate()
print("per layer:", {name: round(value, 1) for name, value in reading.per_layer.items()})
print("defined:", reading.defined, "steps:", reading.steps)
