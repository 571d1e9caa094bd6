"""Gradient accumulation gives the noise scale for free (two batch sizes, no per-example norms);
the same micro-batches give gradient agreement, and Adam's preconditioned noise scale."""

import torch
import torch.nn.functional as F
from torch import nn

from gradnoise.stats.agreement import agreement_from_norms
from gradnoise.stats.preconditioned import adam_preconditioner_fn
from gradnoise.stats.running import NoiseScale
from gradnoise.stats.twobatch import MicroBatchNorms

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
teacher = torch.randn(10, 1)
plain, preconditioned = NoiseScale(window=60), NoiseScale(window=60)
micro_steps, micro_batch = 4, 16

with (
    MicroBatchNorms(model) as micro,
    MicroBatchNorms(model, preconditioner=adam_preconditioner_fn(optimizer, model)) as pre,
):
    for _ in range(120):
        for _micro in range(micro_steps):
            x = torch.randn(micro_batch, 10)
            y = x @ teacher + 0.5 * torch.randn(micro_batch, 1)
            (F.mse_loss(model(x), y) / micro_steps).backward()
        record = micro.record(micro_batch_size=micro_batch)
        plain.update(record)
        preconditioned.update(pre.record(micro_batch_size=micro_batch))
        optimizer.step()
        optimizer.zero_grad()

for name, noise in (("plain", plain), ("Adam-preconditioned", preconditioned)):
    r = noise.estimate()
    print(f"{name}: B_simple {r.b_simple:.1f} [{r.ci_low:.1f}, {r.ci_high:.1f}]")
print(f"micro-batch agreement (last step): {agreement_from_norms(record):.3f}")
