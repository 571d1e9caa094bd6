"""Fine-tune a small GPT with MeZO: two forward passes per step, no backward, inference memory.

The task: sequences over a 10-token sub-vocabulary; the loss falls as the model learns which
tokens occur. ``opt.step(closure)`` only needs the loss (no ``backward()``).
"""

import torch

from gradnoise.optim import MeZO
from gradnoise.testing.models import lm_loss, make_gpt

torch.manual_seed(0)
model, _, _ = make_gpt(8, vocab=100, dim=32, layers=1, context=16)
tokens = torch.randint(0, 10, (8, 17)) * 10  # ten tokens 0, 10, ..., 90
inputs, targets = tokens[:, :-1], tokens[:, 1:]

opt = MeZO(model.parameters(), lr=3e-3, eps=1e-3, seed=0)
with torch.no_grad():
    start = float(lm_loss(model, inputs, targets))
    for _ in range(100):
        opt.step(lambda: lm_loss(model, inputs, targets))
    end = float(lm_loss(model, inputs, targets))
print(f"MeZO: loss {start:.3f} -> {end:.3f} in 100 steps (200 forward passes, no backward)")
assert end < start
