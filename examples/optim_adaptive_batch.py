"""Grow the batch with the noise scale: NoiseScale + BatchSizeController + AdamW on digit images.

The micro-batch stays at 16 examples (flat memory); the controller picks how many micro-batches to
accumulate from the running noise scale and scales Adam's learning rate by the square-root rule.
"""

import torch

from gradnoise.control import BatchSizeController
from gradnoise.stats import GradStats
from gradnoise.stats.running import NoiseScale
from gradnoise.workloads import get_workload

torch.manual_seed(0)
work = get_workload("images", batch_size=16, seed=0)
opt = torch.optim.AdamW(work.model.parameters(), lr=3e-3)
noise = NoiseScale(beta=0.9)
control = BatchSizeController(micro_batch=16, lr_rule="sqrt", warmup=5, max_accumulation=8)
decision = control.decision()

for step in range(20):
    for _ in range(decision.accumulation):
        with GradStats(work.model) as stats:
            loss = work.loss(work.model, next(work.batches))
            (loss / decision.accumulation).backward()
        noise.update(stats)
    for group in opt.param_groups:
        group["lr"] = 3e-3 * decision.lr_scale
    opt.step()
    opt.zero_grad()
    decision = control.update(noise.estimate())
    if step % 10 == 9 or decision.changed:
        print(
            f"step {step}: loss {loss.item():.3f}, B_noise {control.noise_scale:.1f}, "
            f"next batch {decision.batch_size}, lr x{decision.lr_scale:.2f}"
        )
